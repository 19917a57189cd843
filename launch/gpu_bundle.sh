#!/usr/bin/env bash
# A relocatable bundle for the one-shot GPU check (launch/gpu_check.sh) on a GPU
# machine that has the NVIDIA driver and the CUDA toolkit (cuBLAS, NCCL) but
# none of this project's Debian packages (Open MPI, Abseil, protobuf, HDF5,
# OpenBLAS): a cloud image, a container, a node you cannot apt-get on.
#
#   bash launch/gpu_bundle.sh pack [BUILD_DIR] [BUNDLE]    # here, after a CUDA build
#   bash launch/gpu_bundle.sh check BUNDLE                 # there, from the source tree
#   bash launch/gpu_bundle.sh run BUNDLE COMMAND [ARGS...]  # there: COMMAND in the bundle's environment
#
# pack (on the Debian 12 build machine) takes BUILD_DIR (default build-gpu/,
# configured with -DMOE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90) and writes
# BUNDLE (default build-gpu/moe-gpu-bundle.tar.xz) holding:
#   build/bin/      the programs the GPU check runs (moe-train, moe-preprocess,
#                   moe-bench and the gpu-labelled test binaries);
#   build/source_commit   the commit they were built from (+dirty);
#   build/**/CTestTestfile.cmake   the build's test list, its absolute paths
#                   written as the tokens @MOE_BUILD@, @MOE_SRC@ and
#                   @MOE_MPIEXEC@, which `check` rewrites to that machine's paths;
#   lib/            every shared library those programs and Open MPI's and
#                   PMIx's plugins load, except glibc, the C++ runtime, the
#                   driver and the CUDA toolkit's libraries (those must come
#                   from the GPU machine);
#   root/           Open MPI's and PMIx's plugin, help and configuration trees
#                   at their paths on this machine, and mpirun/orted;
#   text/fortunes/  the corpus of the 50-step training run.
# check (on the GPU machine) unpacks it to $MOE_BUNDLE_DIR (default
# /opt/moe-gpu-bundle), links Open MPI's and PMIx's trees to the paths they
# were built for when nothing is there, finds cuBLAS and NCCL, checks that
# every program resolves all its libraries, and runs launch/gpu_check.sh on the
# prebuilt binaries. Nothing is installed over anything the machine has.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "gpu_bundle: $*" >&2; exit 1; }
PROGRAMS=(moe-train moe-preprocess moe-bench gpu_cuda_ops_test comm_nccl_test libmoe_spm_shim.so)
MULTIARCH=x86_64-linux-gnu
# Open MPI's and PMIx's trees (Debian's layout), taken whole.
MPI_TREES=(/usr/lib/$MULTIARCH/openmpi/lib /usr/lib/$MULTIARCH/pmix2 /usr/share/openmpi /etc/openmpi)
# Libraries the GPU machine must provide itself: glibc, the C++ runtime, the
# driver, and anything of the CUDA toolkit.
system_lib() {
  case "$(basename "$1")" in
    ld-linux*|libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|libutil.so*|libresolv.so*) return 0 ;;
    libstdc++.so*|libgcc_s.so*|libcuda.so*|libnvidia-*|linux-vdso*) return 0 ;;
  esac
  case "$1" in /usr/local/cuda*) return 0 ;; esac
  return 1
}

pack() {
  local build="${1:-$ROOT/build-gpu}" bundle="${2:-}"
  build="$(cd "$build" && pwd)" || die "no build directory $1"
  bundle="${bundle:-$build/moe-gpu-bundle.tar.xz}"
  local p
  for p in "${PROGRAMS[@]}"; do
    [ -x "$build/bin/$p" ] || die "$build/bin/$p is missing: cmake --build $build --target ${PROGRAMS[*]}"
  done
  [[ "$(ldd "$build/bin/moe-train")" == *libcudart* ]] ||
    die "$build is not a CUDA build: configure it with -DMOE_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90"
  local stage; stage="$(mktemp -d)"; trap 'rm -rf "$stage"' RETURN
  mkdir -p "$stage/build/bin" "$stage/root" "$stage/text"
  for p in "${PROGRAMS[@]}"; do cp "$build/bin/$p" "$stage/build/bin/"; done
  # The source commit the programs were built from (+dirty with uncommitted
  # changes), which gpu_check.sh puts in its summary.
  local commit; commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  [ -z "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit+dirty"
  echo "$commit" > "$stage/build/source_commit"
  strip --strip-debug "$stage"/build/bin/*
  # The test list, this machine's build, source and mpiexec paths written as
  # @MOE_BUILD@, @MOE_SRC@ and @MOE_MPIEXEC@.
  local mpiexec; mpiexec="$(sed -n 's/^MOE_MPIEXEC:FILEPATH=//p' "$build/CMakeCache.txt")"
  (cd "$build" && find . -name CTestTestfile.cmake) | while read -r f; do
    mkdir -p "$stage/build/$(dirname "$f")"
    sed -e "s|$build|@MOE_BUILD@|g" -e "s|$ROOT|@MOE_SRC@|g" ${mpiexec:+-e "s|$mpiexec|@MOE_MPIEXEC@|g"} \
      "$build/$f" > "$stage/build/$f"
  done
  # Open MPI's and PMIx's trees, then the closure of every ELF file's libraries.
  for p in "${MPI_TREES[@]}"; do
    [ -e "$p" ] || continue
    mkdir -p "$stage/root$(dirname "$p")"
    cp -a "$p" "$stage/root$(dirname "$p")/"
  done
  find "$stage/root" -name '*.a' -delete
  mkdir -p "$stage/root/usr/bin"
  cp -L /usr/bin/orterun "$stage/root/usr/bin/orterun"
  cp -L /usr/bin/orted "$stage/root/usr/bin/orted"
  ln -s orterun "$stage/root/usr/bin/mpirun"; ln -s orterun "$stage/root/usr/bin/mpiexec"
  local elf lib missing=0
  : > "$stage/libs.txt"
  while read -r elf; do
    ldd "$elf" 2>/dev/null | awk '/=>/ {print $1, $3}' | while read -r name lib; do
      if [ "$lib" = "not" ]; then echo "gpu_bundle: $elf needs $name, not found here" >&2; continue; fi
      system_lib "$lib" && continue
      echo "$name $lib"
    done >> "$stage/libs.txt"
  done < <(find "$stage/build/bin" "$stage/root" -type f \( -perm -u+x -o -name '*.so*' \) -exec sh -c \
             'head -c4 "$1" | grep -q ELF && echo "$1"' _ {} \;)
  mkdir -p "$stage/lib"
  sort -u "$stage/libs.txt" | while read -r name lib; do
    [ -e "$stage/lib/$name" ] || cp -L "$lib" "$stage/lib/$name"
  done
  rm "$stage/libs.txt"
  [ -d /usr/share/games/fortunes ] || die "no corpus: apt-get install fortunes"
  cp -a /usr/share/games/fortunes "$stage/text/fortunes"
  tar -C "$stage" -cJf "$bundle.tmp" build lib root text
  mv "$bundle.tmp" "$bundle"
  echo "gpu_bundle: $bundle ($(du -h "$bundle" | cut -f1)): ${PROGRAMS[*]}, $(ls "$stage/lib" | wc -l) libraries"
}

# setup BUNDLE: unpack it and export the environment its programs run in.
setup() {
  local bundle="$1"
  local dir="${MOE_BUNDLE_DIR:-/opt/moe-gpu-bundle}"
  bundle="$(cd "$(dirname "$bundle")" && pwd)/$(basename "$bundle")"
  rm -rf "$dir"; mkdir -p "$dir"
  tar -C "$dir" -xJf "$bundle"
  # Open MPI and PMIx find their plugins at the paths they were built for; link
  # those paths to the bundle where the machine has nothing there.
  local p
  for p in "${MPI_TREES[@]}"; do
    [ -e "$dir/root$p" ] || continue
    if [ -e "$p" ] || [ -L "$p" ]; then
      echo "gpu_bundle: $p exists on this machine; using the bundle's through OPAL_PREFIX" >&2
      export OPAL_PREFIX="$dir/root/usr"
      export OMPI_MCA_mca_base_component_path="$dir/root/usr/lib/$MULTIARCH/openmpi/lib/openmpi3"
      export PMIX_MCA_mca_base_component_path="$dir/root/usr/lib/$MULTIARCH/pmix2/lib/pmix"
      continue
    fi
    mkdir -p "$(dirname "$p")"
    ln -s "$dir/root$p" "$p"
  done
  # cuBLAS, cuBLASLt and NCCL from this machine's CUDA toolkit (or the NVIDIA
  # Python wheels, which carry the same libraries).
  local cuda_dirs="" lib found
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
    found=""
    for p in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/$MULTIARCH; do
      [ -e "$p/$lib" ] && { found="$p"; break; }
    done
    [ -n "$found" ] || found="$(dirname "$(timeout 60 find / -xdev \( -path /proc -o -path "$dir" \) -prune -o \
                                 -name "$lib" -print 2>/dev/null | head -1)")"
    [ "$found" != "." ] && [ -n "$found" ] || die "$lib not found on this machine (the CUDA 13 toolkit with NCCL)"
    case ":$cuda_dirs:" in *":$found:"*) ;; *) cuda_dirs="$cuda_dirs:$found" ;; esac
  done
  export PATH="$dir/root/usr/bin:$PATH"
  export LD_LIBRARY_PATH="$dir/lib${cuda_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu_bundle: CUDA libraries from ${cuda_dirs#:}" >&2
  local bad=0 f missing
  for f in "$dir"/build/bin/* "$dir/root/usr/bin/orterun"; do
    missing="$(ldd "$f" | grep "not found" || true)"
    if [ -n "$missing" ]; then echo "gpu_bundle: $f: $(tr -s ' \t\n' ' ' <<< "$missing")" >&2; bad=1; fi
  done
  [ "$bad" = 0 ] || die "libraries missing (above)"
  # The test list's @MOE_BUILD@, @MOE_SRC@ and @MOE_MPIEXEC@: this machine's paths.
  local mpiexec; mpiexec="$(command -v mpiexec)"
  find "$dir/build" -name CTestTestfile.cmake -exec sed -i -e "s|@MOE_BUILD@|$dir/build|g" \
    -e "s|@MOE_SRC@|$ROOT|g" -e "s|@MOE_MPIEXEC@|$mpiexec|g" {} +
  export MOE_GPU_BUILD_DIR="$dir/build" MOE_GPU_TEXT="$dir/text/fortunes"
  # The bundle's PMIx also scans the machine's own plugin directory; its
  # compression plugin there (another PMIx version) does not load, harmlessly.
  export PMIX_MCA_pcompress_base_silence_warning=1
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  check)
    [ $# -ge 2 ] || die "usage: gpu_bundle.sh check BUNDLE [gpu_check.sh's environment]"
    setup "$2"; shift 2
    MOE_GPU_PREBUILT=1 exec bash "$ROOT/launch/gpu_check.sh" "$@" ;;
  run)
    [ $# -ge 3 ] || die "usage: gpu_bundle.sh run BUNDLE COMMAND [ARGS...]"
    setup "$2"; shift 2
    exec "$@" ;;
  *) die "usage: gpu_bundle.sh pack [BUILD_DIR] [BUNDLE] | check BUNDLE | run BUNDLE COMMAND [ARGS...]" ;;
esac

