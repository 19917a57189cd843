#!/usr/bin/env bash
# The README's test command: installs the Debian packages it needs, builds,
# and runs every test (unit and multi-rank) with ctest.
#   bash launch/test.sh [extra ctest args, e.g. -L mpi or -R layout]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
moe_install_packages "${MOE_TEST_PACKAGES[@]}"
moe_build
moe_mpi_env
cd "$MOE_BUILD_DIR"
ctest --output-on-failure --timeout 900 -j"${MOE_TEST_JOBS:-1}" "$@"
