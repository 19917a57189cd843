#!/bin/bash
# missing_source_test.sh SOURCE_DIR CMAKE: launch/CMakeLists.txt, in a fixture
# project with stand-in libraries, configures when every tool's source is there
# and fails naming the file when one is missing (moe_ckpt.cc, then moe-launch).
set -u
src=$1
cmake=$2
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe_launch_sources.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
failures=0

make_tree() {
  rm -rf "$tmp/tree" "$tmp/build"
  mkdir -p "$tmp/tree/launch/bench"
  cp "$src/launch/CMakeLists.txt" "$tmp/tree/launch/"
  for f in moe_train.cc moe_preprocess.cc moe_ckpt.cc bench/bench_main.cc; do
    echo 'int main() { return 0; }' >"$tmp/tree/launch/$f"
  done
  printf '#!/bin/sh\n' >"$tmp/tree/launch/moe-launch"
  printf '#!/bin/sh\n' >"$tmp/tree/launch/moe-profile"
  cat >"$tmp/tree/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(launch_fixture CXX)
add_library(moe_runtime INTERFACE)
add_library(moe_data INTERFACE)
add_subdirectory(launch)
CMAKE
}
configure() { "$cmake" -S "$tmp/tree" -B "$tmp/build" >"$tmp/out" 2>&1; }

make_tree
if configure; then echo "ok   (every source present: configures)"; else
  echo "FAIL: the complete fixture does not configure:"; cat "$tmp/out"; failures=$((failures + 1)); fi

for missing in moe_ckpt.cc moe-launch moe-profile bench/bench_main.cc; do
  make_tree
  rm "$tmp/tree/launch/$missing"
  if configure; then
    echo "FAIL: configured without launch/$missing"
    failures=$((failures + 1))
  elif ! grep -qF "launch/$missing, the source of" "$tmp/out"; then
    echo "FAIL: configure failed without naming launch/$missing:"
    cat "$tmp/out"
    failures=$((failures + 1))
  else
    echo "ok   (launch/$missing missing: configure fails naming it)"
  fi
done
[ "$failures" -eq 0 ] || { echo "$failures case(s) failed"; exit 1; }
echo "all cases passed"
