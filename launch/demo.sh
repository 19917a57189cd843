#!/usr/bin/env bash
# The README's first command: installs what it needs, builds, and runs the
# embedded default job (configs/demo.textproto) on 4 ranks.
#   bash launch/demo.sh [field.path=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
moe_install_packages
moe_build
moe_mpi_env
cd "$MOE_ROOT"
exec mpirun -np 4 --oversubscribe -x OPENBLAS_NUM_THREADS=1 \
  "$MOE_BUILD_DIR/bin/moe-train" --config=configs/demo.textproto "$@"
