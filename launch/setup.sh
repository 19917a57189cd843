#!/usr/bin/env bash
# Installs moe-runtime's Debian packages (when missing) and builds into build/.
# Sourced by launch/demo.sh and launch/test.sh; safe to run again: it installs
# nothing that is present and rebuilds only what changed.
#
#   MOE_BUILD_DIR   build folder (default: build)
#   MOE_WITH_CUDA   AUTO (default), ON or OFF
#   MOE_JOBS        parallel build jobs (default: number of cores)
set -euo pipefail

MOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE_BUILD_DIR="${MOE_BUILD_DIR:-$MOE_ROOT/build}"
MOE_PACKAGES=(build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev hdf5-tools
  libprotobuf-dev protobuf-compiler libabsl-dev catch2 libopenblas-dev
  libsentencepiece-dev sentencepiece python3-sentencepiece  # --tokenizer spm:, spm_train, tests
  python3 python3-numpy python3-h5py fortunes
  chromium  # tests/launch/profile_report_test: the report opened in a headless browser
  iproute2 util-linux)  # the cluster tests: ip netns, unshare

# What only the tests need: a Slurm controller, node daemon and munge for the
# slurm tests (they configure and start their own, on loopback); clang and its
# runtime libraries for the sanitizer builds and libFuzzer (launch/sanitize.sh);
# xz for launch_gpu_bundle_test (launch/gpu_bundle.sh packs with tar -J).
MOE_TEST_PACKAGES=(slurm-wlm munge clang libclang-rt-14-dev xz-utils)

# moe_install_packages [EXTRA_PACKAGE...]: installs MOE_PACKAGES and the extras.
moe_install_packages() {
  local missing=() wanted=("${MOE_PACKAGES[@]}" "$@")
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "moe-runtime: this setup needs Debian 12 (apt-get and dpkg). On another system install:" >&2
    echo "  ${wanted[*]}" >&2
    echo "(Open MPI, HDF5 built with Open MPI, protobuf, Abseil, Catch2 v2, OpenBLAS, CMake >= 3.25)" >&2
    return 1
  fi
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "moe-runtime: need root or sudo to install: ${missing[*]}" >&2; return 1; }
    sudo="sudo"
  fi
  echo "moe-runtime: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

moe_build() {
  local jobs="${MOE_JOBS:-$(nproc)}"
  if [ ! -f "$MOE_BUILD_DIR/CMakeCache.txt" ]; then
    cmake -S "$MOE_ROOT" -B "$MOE_BUILD_DIR" -DMOE_WITH_CUDA="${MOE_WITH_CUDA:-AUTO}" >/dev/null
  fi
  cmake --build "$MOE_BUILD_DIR" -j"$jobs"
}

# mpirun refuses root unless told so; these are set only when running as root.
moe_mpi_env() {
  if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  moe_install_packages
  moe_build
fi
