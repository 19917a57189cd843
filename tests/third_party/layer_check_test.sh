#!/bin/bash
# layer_check_test.sh SOURCE_DIR CMAKE: proves that the layer check rejects each
# kind of violation (naming the file, the include and the rule) and accepts the
# includes each layer owns. Exit 0 when every case behaves, 1 otherwise.
set -u
src=$1
cmake=$2
check=$src/third_party/cmake/check_layer_includes.cmake
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe_layer_check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
failures=0

# put FILE LINE...: writes the lines into tree/FILE.
put() {
  local f=$tmp/tree/$1
  shift
  mkdir -p "$(dirname "$f")"
  printf '%s\n' "$@" >"$f"
}
run_check() {  # LAYER ALLOWED -> output in $tmp/out, status returned
  "$cmake" -DROOT="$tmp/tree" -DLAYER="$1" -DALLOWED="$2" -P "$check" >"$tmp/out" 2>&1
}
expect_ok() {  # NAME LAYER ALLOWED
  if ! run_check "$2" "$3"; then
    echo "FAIL ($1): the check rejected a tree it must accept:"
    cat "$tmp/out"
    failures=$((failures + 1))
  else
    echo "ok   ($1)"
  fi
}
expect_fail() {  # NAME LAYER ALLOWED TEXT...
  local name=$1 layer=$2 allowed=$3
  shift 3
  if run_check "$layer" "$allowed"; then
    echo "FAIL ($name): the check accepted a violation"
    failures=$((failures + 1))
    return
  fi
  local text
  for text in "$@"; do
    if ! grep -qF -- "$text" "$tmp/out"; then
      echo "FAIL ($name): the error does not say: $text"
      cat "$tmp/out"
      failures=$((failures + 1))
      return
    fi
  done
  echo "ok   ($name)"
}
reset() { rm -rf "$tmp/tree"; mkdir -p "$tmp/tree"; }

# What each layer owns is accepted.
reset
put comm/mpi_communicator.cc '#include <mpi.h>' '#include "comm/communicator.h"' '#include "runtime/core/status.h"'
put comm/cuda/nccl_communicator.cc '#include <mpi.h>' '#include <nccl.h>' '#include <cuda_runtime_api.h>' \
  '#include "comm/cuda/cuda_check.h"'
expect_ok "comm owns mpi.h, nccl.h; comm/cuda owns cuda*.h" comm comm,runtime/core
put runtime/core/cpu/cpu_gemm.cc '#include <cblas.h>' '#include "runtime/core/tensor.h"'
put runtime/core/cuda/matmul.cu '#include <cublas_v2.h>' '#include <cuda_bf16.h>' '#include <cuda.h>'
put runtime/core/tensor.h '#include <vector>' '#include "absl/status/status.h"'
expect_ok "runtime/core/cpu owns cblas.h; runtime/core/cuda owns cuda*.h, cublas*.h" runtime/core runtime/core

# Each violation is rejected, naming the file, the include and the rule.
reset
put model/moe_layer.cc '#include "model/moe_layer.h"' '#include <mpi.h>'
expect_fail "mpi.h outside comm" model model,parallel,comm,runtime/core,data \
  "model/moe_layer.cc: includes <mpi.h>, which only comm/ may include (only comm/ talks to MPI and NCCL)"
reset
put parallel/token_exchange.h '#include <nccl.h>'
expect_fail "nccl.h outside comm" parallel parallel,comm,runtime/core,data \
  "parallel/token_exchange.h: includes <nccl.h>, which only comm/ may include"
reset
put runtime/core/ops.cc '#include <cblas.h>'
expect_fail "cblas.h in runtime/core but outside cpu/" runtime/core runtime/core \
  "runtime/core/ops.cc: includes <cblas.h>, which only runtime/core/cpu/ may include (only the CPU backend"
reset
put runtime/core/cpu/cpu_nn.cc '#include <cuda_runtime.h>'
expect_fail "cuda_runtime.h in the CPU backend (cpu/ is scanned)" runtime/core runtime/core \
  "runtime/core/cpu/cpu_nn.cc: includes <cuda_runtime.h>, which only comm/cuda/ and runtime/core/cuda/ may include"
reset
put runtime/core/cpu/cpu_backend.cc '#include "comm/communicator.h"'
expect_fail "an upward include from the CPU backend" runtime/core runtime/core \
  "runtime/core/cpu/cpu_backend.cc: includes \"comm/communicator.h\" (layer comm/), but runtime/core/ may only use: runtime/core"
reset
put comm/communicator.cc '#include <cuda_bf16.h>'
expect_fail "cuda_bf16.h in comm/ but outside comm/cuda/" comm comm,runtime/core \
  "comm/communicator.cc: includes <cuda_bf16.h>"
reset
put comm/cuda/nccl_communicator.cc '#include <cublas_v2.h>'
expect_fail "cublas in the NCCL communicator" comm comm,runtime/core \
  "comm/cuda/nccl_communicator.cc: includes <cublas_v2.h>, which only runtime/core/cuda/ may include"
reset
put optim/optimizer.cc '#include <cuda.h>'
expect_fail "cuda.h in optim" optim optim,parallel,comm,runtime/core,data "optim/optimizer.cc: includes <cuda.h>"
reset
put data/dataset.cc '#include "model/model.h"'
expect_fail "data includes model" data data,runtime/core \
  "data/dataset.cc: includes \"model/model.h\" (layer model/), but data/ may only use: data,runtime/core"

# A whole build: a fixture project of two layers builds; with a file that
# includes <mpi.h> in model/ the build stops at the check, before compiling.
reset
cat >"$tmp/tree/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.25)
project(layer_check_fixture CXX)
list(APPEND CMAKE_MODULE_PATH "$src/third_party/cmake")
include(MoeLayers)
moe_add_layer(moe_core DIR runtime/core)
moe_add_layer(moe_model DIR model DEPS moe_core)
CMAKE
put runtime/core/core.h 'int CoreValue();'
put runtime/core/core.cc '#include "runtime/core/core.h"' 'int CoreValue() { return 1; }'
put model/model.cc '#include "runtime/core/core.h"' 'int ModelValue() { return CoreValue() + 1; }'
if ! { "$cmake" -S "$tmp/tree" -B "$tmp/build" && "$cmake" --build "$tmp/build"; } >"$tmp/out" 2>&1; then
  echo "FAIL (fixture build): the good fixture does not build:"
  cat "$tmp/out"
  failures=$((failures + 1))
else
  echo "ok   (fixture build: the good tree builds)"
fi
put model/bad.cc '#include <mpi.h>' 'int Bad() { return MPI_SUCCESS; }'
if { "$cmake" -S "$tmp/tree" -B "$tmp/build" && "$cmake" --build "$tmp/build"; } >"$tmp/out" 2>&1; then
  echo "FAIL (fixture build): a build with model/bad.cc including <mpi.h> succeeded"
  failures=$((failures + 1))
elif ! grep -qF "model/bad.cc: includes <mpi.h>, which only comm/ may include" "$tmp/out"; then
  echo "FAIL (fixture build): the build failed without the layer check's message:"
  cat "$tmp/out"
  failures=$((failures + 1))
elif grep -q "bad.cc.o" "$tmp/out"; then
  echo "FAIL (fixture build): model/bad.cc was compiled before the check stopped the build"
  cat "$tmp/out"
  failures=$((failures + 1))
else
  echo "ok   (fixture build: a violating file fails the build with the check's message)"
fi

if [ "$failures" -ne 0 ]; then
  echo "$failures case(s) failed"
  exit 1
fi
echo "all cases passed"
