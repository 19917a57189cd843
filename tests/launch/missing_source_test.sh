#!/usr/bin/env bash
# missing_source_test.sh BIN_DIR SOURCE_DIR CMAKE: launch/CMakeLists.txt, in a fixture
# project with stand-in libraries, configures when every tool's source is there
# and fails naming the file when one is missing (moe_ckpt.cc, then moe-launch).
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$1" "$2"
cmake=$3

make_tree() {
  rm -rf "$TMP/tree" "$TMP/build"
  mkdir -p "$TMP/tree/launch/bench"
  cp "$SRC/launch/CMakeLists.txt" "$TMP/tree/launch/"
  for f in moe_train.cc moe_preprocess.cc moe_ckpt.cc bench/bench_main.cc; do
    echo 'int main() { return 0; }' >"$TMP/tree/launch/$f"
  done
  printf '#!/bin/sh\n' >"$TMP/tree/launch/moe-launch"
  printf '#!/bin/sh\n' >"$TMP/tree/launch/moe-profile"
  cat >"$TMP/tree/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(launch_fixture CXX)
add_library(moe_runtime INTERFACE)
add_library(moe_data INTERFACE)
add_subdirectory(launch)
CMAKE
}
configure() { "$cmake" -S "$TMP/tree" -B "$TMP/build" >"$TMP/out" 2>&1; }

make_tree
if configure; then echo "ok   (every source present: configures)"; else
  test_fail "the complete fixture does not configure:" "$TMP/out"; fi

for missing in moe_ckpt.cc moe-launch moe-profile bench/bench_main.cc; do
  make_tree
  rm "$TMP/tree/launch/$missing"
  if configure; then
    test_fail "configured without launch/$missing"
  elif ! grep -qF "launch/$missing, the source of" "$TMP/out"; then
    test_fail "configure failed without naming launch/$missing:" "$TMP/out"
  else
    echo "ok   (launch/$missing missing: configure fails naming it)"
  fi
done
test_done "missing source test"
