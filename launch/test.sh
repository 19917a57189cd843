#!/usr/bin/env bash
# The README's test command: installs the Debian packages it needs, builds,
# runs every test (unit and multi-rank) with ctest, then the ASan+UBSan build's
# tests, the fuzzers and the TSan build's tests (launch/sanitize.sh).
#   bash launch/test.sh [extra ctest args, e.g. -L mpi or -R layout]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
moe_install_packages "${MOE_TEST_PACKAGES[@]}"
moe_build
moe_mpi_env
cd "$MOE_BUILD_DIR"
# A test that fails is run once more (multi-rank and Slurm tests can lose a race on a loaded
# machine); a test that fails twice fails the run.
ctest --output-on-failure --timeout 900 --repeat until-pass:2 -j"${MOE_TEST_JOBS:-1}" "$@"
# Then the sanitizer builds and the fuzzers (launch/sanitize.sh), unless ctest
# arguments chose a subset or MOE_SANITIZERS=0.
if [ $# -eq 0 ] && [ "${MOE_SANITIZERS:-1}" != 0 ]; then
  bash "$MOE_ROOT/launch/sanitize.sh"
fi
