#!/usr/bin/env bash
# A rehearsal of the one-shot GPU check on this machine, so that the few minutes
# of a lent GPU are not lost to a packaging mistake (CUDA builds only:
# tests/launch/CMakeLists.txt). launch/gpu_bundle.sh packs this build, unpacks
# the bundle into a temporary directory and runs launch/gpu_check.sh on it, with
# an nvidia-smi stand-in that lists one GPU. There is no usable GPU here (the
# driver is too old or absent), so every phase must get as far as the device
# probe and stop there with that reason, and the summary must still be whole:
# - every gpu-labelled test of this build is in the bundle's test list and is
#   Skipped for want of a device (not "Not Run": a test binary missing from the
#   bundle, or Failed: a script or path the bundle breaks);
# - every benchmark and the training run reach the device probe ("no usable CUDA
#   device"), so their programs and libraries load;
# - each program's libraries resolve inside the bundle, except those the GPU
#   machine must provide (glibc, the C++ runtime, the driver, the CUDA toolkit),
#   as on a machine without this project's packages;
# - the JSON summary has every key the notes quote, and "ok": false.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/test_env.sh"
test_init "$@"
BUILD="$(dirname "$BIN")"
mkdir -p fakebin
cat > fakebin/nvidia-smi <<'EOF'
#!/bin/sh
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
EOF
chmod +x fakebin/nvidia-smi

timeout 300 bash "$SRC/launch/gpu_bundle.sh" pack "$BUILD" "$TMP/bundle.tar.xz" > pack.out 2>&1 ||
  test_fail "gpu_bundle.sh pack: exit $?" pack.out
expect_in pack.out "gpu_bundle: $TMP/bundle.tar.xz"
[ "$fail" = 0 ] || test_done "gpu bundle"

# The check, as on the GPU machine (exit 1 here: nothing could run on a GPU).
export MOE_BUNDLE_DIR="$TMP/unpacked"
rc=0
PATH="$TMP/fakebin:$PATH" timeout 600 bash "$SRC/launch/gpu_bundle.sh" check "$TMP/bundle.tar.xz" \
  > check.out 2> check.err || rc=$?
[ "$rc" = 1 ] || test_fail "gpu_bundle.sh check: exit $rc, expected 1 (no usable GPU here)" check.out check.err
summary="$(grep '^{' check.out | tail -1)"
[ -n "$summary" ] || test_fail "gpu_bundle.sh check printed no JSON summary" check.out check.err

# The gpu tests this build defines, each Skipped in the bundle's run.
(cd "$BUILD" && ctest -N -L gpu) | sed -n 's/^ *Test *#[0-9]*: *//p' | sort > expected_tests.txt
[ -s expected_tests.txt ] || test_fail "this build lists no gpu test"
head="$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || true)"  # the bundle records the build's commit
python3 - "$summary" expected_tests.txt "$head" > summary_check.out 2>&1 <<'PY' || test_fail "the summary" summary_check.out
import json, sys
s = json.loads(sys.argv[1])
expected = [l.strip() for l in open(sys.argv[2]) if l.strip()]
bad = []
keys = ["ok", "gpus", "commit", "seconds", "budget_s", "tests", "grouped_gemm_bf16", "model_step", "model_step_gemm_attention",
        "model_step_flash_attention", "attention", "attention_bf16", "checkpoint", "host_copy", "optim_update", "router_host", "memcheck", "train"]
bad += ["missing key " + k for k in keys if k not in s]
# The router's host benchmark needs no GPU: its figures must be there.
if "forward_ms" not in ((s.get("router_host") or {}).get("figures") or {}): bad.append("router_host has no forward_ms")
if s.get("ok") is not False: bad.append("ok is %r, expected false" % s.get("ok"))
if "H100" not in s.get("gpus", ""): bad.append("gpus is %r" % s.get("gpus"))
head = sys.argv[3]
if head and not s.get("commit", "").startswith(head): bad.append("commit is %r, this tree's is %s" % (s.get("commit"), head))
res = (s.get("tests") or {}).get("results", {})
for t in expected:
    if res.get(t) != "Skipped": bad.append("test %s: %s" % (t, res.get(t, "not in the bundle's run")))
for t in res:
    if t not in expected: bad.append("test %s ran but this build does not list it" % t)
if s.get("train", {}).get("exit") != 2: bad.append("train exit %r, expected 2" % s.get("train", {}).get("exit"))
print("\n".join(bad) if bad else "summary ok: %d gpu tests skipped, every key present" % len(expected))
sys.exit(1 if bad else 0)
PY
cat summary_check.out

# Why each test skipped: the device probe, nothing else.
logs="$TMP/unpacked/build/gpu_check"
n_tests=$(wc -l < expected_tests.txt)
n_skips=$(grep -c "^skipped: .*CUDA dev" "$logs/LastTest.log" || true)
[ "$n_skips" = "$n_tests" ] && echo "ok: $n_tests tests skipped at the device probe" ||
  test_fail "$n_skips of $n_tests tests skipped at the device probe" "$logs/LastTest.log"
# Every benchmark and the training run stopped at the device probe, except the
# router's host benchmark, which runs on the CPU and must give its figures.
for f in "$logs"/bench_*.log "$logs/train/train.log"; do
  if [ "$(basename "$f")" = bench_router.log ]; then
    grep -q '"suite":"router"' "$f" || test_fail "bench_router.log: no measurement" "$f"
  elif ! grep -q "no usable CUDA device" "$f"; then test_fail "$(basename "$f"): not stopped at the device probe" "$f"; fi
  if grep -q "error while loading shared libraries" "$f"; then test_fail "$(basename "$f"): a library is missing" "$f"; fi
done
n_bench=$(ls "$logs"/bench_*.log | wc -l)
[ "$n_bench" -ge 13 ] && echo "ok: $n_bench benchmark logs" || test_fail "only $n_bench benchmark logs" check.err

# In the bundle's environment, every library of every program resolves to the
# bundle or to what the GPU machine provides.
bash "$SRC/launch/gpu_bundle.sh" run "$TMP/bundle.tar.xz" bash -c \
  'for f in "$MOE_GPU_BUILD_DIR"/bin/* "$(command -v orterun)"; do ldd "$f" | sed "s|^|$(basename "$f"): |"; done' \
  > ldd.out 2> ldd.err || test_fail "gpu_bundle.sh run: exit $?" ldd.err
outside=$(grep "=> /" ldd.out | grep -v "=> $TMP/unpacked/" |
  grep -v -E "=> /usr/local/cuda|/(ld-linux[^/]*|libc|libm|libpthread|libdl|librt|libutil|libresolv|libstdc\+\+|libgcc_s|libcuda)\.so" || true)
[ -z "$outside" ] && echo "ok: every library resolves in the bundle ($(grep -c "=> $TMP/unpacked/" ldd.out) lookups)" ||
  test_fail "libraries resolved outside the bundle:
$outside"
grep -q "not found" ldd.out && test_fail "a library is not found" ldd.out

# The check's budget (MOE_GPU_CHECK_BUDGET_S): a bad value stops it before
# anything runs; a small one cuts the phases short, and the summary is still
# printed, the phases left out null.
bad_rc=0
PATH="$TMP/fakebin:$PATH" MOE_GPU_CHECK_BUDGET_S=8min bash "$SRC/launch/gpu_check.sh" > bad.out 2>&1 || bad_rc=$?
[ "$bad_rc" = 1 ] || test_fail "MOE_GPU_CHECK_BUDGET_S=8min: exit $bad_rc, expected 1" bad.out
expect_in bad.out "MOE_GPU_CHECK_BUDGET_S=8min: the seconds all phases after the build may take together"
t0=$(date +%s)
rc=0
PATH="$TMP/fakebin:$PATH" MOE_GPU_CHECK_BUDGET_S=15 timeout 300 bash "$SRC/launch/gpu_bundle.sh" check \
  "$TMP/bundle.tar.xz" > budget.out 2> budget.err || rc=$?
took=$(( $(date +%s) - t0 ))
[ "$rc" = 1 ] || test_fail "check with a 15 s budget: exit $rc, expected 1" budget.out budget.err
expect_in budget.err "not run, the check's 15 s budget is spent (MOE_GPU_CHECK_BUDGET_S)"
python3 -c 'import json,sys
s=json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
assert s["budget_s"] == 15, s["budget_s"]
print("ok: summary printed with the budget spent, %d s of phases" % s["seconds"])' budget.out ||
  test_fail "the summary of the 15 s budget's check" budget.out
# The unpacking and the last phase's kill grace (10 s) come on top of the budget.
[ "$took" -lt 120 ] && echo "ok: the 15 s budget's check took $took s" || test_fail "the 15 s budget's check took $took s"
test_done "gpu bundle"
