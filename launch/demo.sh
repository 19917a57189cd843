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
# The corpus: Debian's fortunes (~2.5 MB of English text), tokenized once.
if [ ! -f runs/data/fortunes.idx ] || [ ! -f runs/data/fortunes.bin ]; then
  mkdir -p runs/data
  "$MOE_BUILD_DIR/bin/moe-preprocess" --output-prefix runs/data/fortunes --split=percent /usr/share/games/fortunes
fi
exec mpirun -np 4 --oversubscribe -x OPENBLAS_NUM_THREADS=1 \
  "$MOE_BUILD_DIR/bin/moe-train" --config=configs/demo.textproto "$@"
