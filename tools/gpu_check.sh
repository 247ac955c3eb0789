#!/usr/bin/env bash
# The GPU layer on a real GPU, in one run of at most ~8 minutes (issue 17). Usage:
#
#   tools/gpu_check.sh [RESULTS_DIR]        (default: $OUT, else build/gpu-check)
#
# Steps, each under its own `timeout` and all inside one wall-clock budget (GPU_CHECK_BUDGET_S, default
# 470 s: a step gets what is left of it, and is skipped when under 20 s remain), so the script never hangs:
#   env        nvidia-smi, python / torch / CUDA / nvcc / ninja / compute-sanitizer versions
#   build      the JIT build of the CUDA extension (tools/gpu_kernel_run.py build), then the first-use
#              self-checks run directly on this GPU, the fp32-out addmm probe and the chunked loss's grad_W path
#   pytest     RWKVSLICE_TEST_DEVICE=cuda RWKVSLICE_TEST_DTYPE=bfloat16 RWKVSLICE_REQUIRE_CUDA=1
#              python -m pytest tests/runtime -m "gpu or not slow" (JUnit XML), with the machine's own torch
#              (nox would try to install one, and the device machine reaches no registry). The sanitizer
#              tests are deselected there: the next steps run the same checks once each.
#   memcheck, racecheck   compute-sanitizer on tools/gpu_kernel_run.py sanitize (forward + backward, our
#              kernels only: --kernel-name kns=wkv7)
#   bench-kernel   benchmarks/bench_kernel.py: ours vs the official RWKV-LM kernel vs the torch backend
#              (B=8, T=4096, C=4096, N=64, forward+backward ms and peak memory)
#   bench-train    benchmarks/bench_train.py --gpu-only: 12 x 768, vocab 65536, ctx 512, bf16, sliced vs full
#              logits, and the loss alone vs torch's F.linear_cross_entropy
#   synccheck, initcheck  the other two sanitizer tools, if the budget still allows
# Results (at most 8 files, the device tool's limit): summary.md (one line per step, versions), log.txt (every
# step's output), pytest.xml, sanitizer.txt, bench-kernel.md, bench-train.md.
# Exit status: 0 every step passed, 1 some step failed or timed out, 3 no CUDA device (nothing was checked).
#
# What the device machine lacks, carried in the call (see TESTING.md, "The GPU check"):
# - the official kernel's source for bench-kernel, never committed here: BlinkDL/RWKV-LM at commit 4cd8e31,
#   RWKV-v7/train_temp/cuda/{wkv7_cuda.cu,wkv7_op.cpp}, copied into an ignored folder (.gpu-carry/rwkv-lm)
#   named in `carry`; the script looks there, or in $RWKV_LM_DIR. Without it the official column is
#   "not run" and says so.
# - Python packages it lacks, as wheels in .whl/ (device README: pip download --only-binary=:all:
#   --python-version 3.12 ...), named in `carry`: installed with --no-index into /tmp/site first. The GPU
#   layer needs none (torch, pytest, pytest-xdist, hypothesis, safetensors, tqdm, numpy, ninja are there;
#   tests that need the `rwkv` package skip with that reason).

set -u
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="${1:-${OUT:-$ROOT/build/gpu-check}}"
mkdir -p "$RESULTS" || exit 1
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
SUMMARY="$RESULTS/summary.md"
LOG="$RESULTS/log.txt"
SANLOG="$RESULTS/sanitizer.txt"
START=$(date +%s)
FAILED=0
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
export RWKVSLICE_BUILD_DIR="${RWKVSLICE_BUILD_DIR:-/tmp/rwkvslice-gpu-check-build}"
: >"$LOG"
: >"$SANLOG"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# One torch import for both: the versions line and whether torch sees a CUDA device.
PROBE="$("$PY" -c '
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print("ok" if torch.cuda.is_available() else f"no CUDA device (torch {torch.__version__}, CUDA build "
      f"{torch.version.cuda}, torch.cuda.is_available() is False)")' 2>&1)"
if [ "$(printf '%s\n' "$PROBE" | wc -l)" -eq 2 ]; then
  TORCH_LINE="$(printf '%s\n' "$PROBE" | head -1)"
  CUDA_STATUS="$(printf '%s\n' "$PROBE" | tail -1)"
else
  TORCH_LINE="torch failed to import"
  CUDA_STATUS="$(printf '%s\n' "$PROBE" | tail -1)"
fi

{
  echo "# GPU check"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- Command: \`tools/gpu_check.sh\` (budget ${BUDGET_S} s)"
  echo "- Machine: $(uname -m), $(nproc) CPU cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'none (nvidia-smi failed or absent)')"
  echo "- Versions: ${TORCH_LINE}," \
    "nvcc $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || true)," \
    "ninja $(ninja --version 2>/dev/null || echo absent)"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
} >"$SUMMARY"

if [ "$CUDA_STATUS" != "ok" ]; then
  case "$CUDA_STATUS" in no\ CUDA*) ;; *) CUDA_STATUS="no CUDA device checked: $PY could not import torch (${CUDA_STATUS:-no output})" ;; esac
  echo "| all | not run: $CUDA_STATUS | 0 |" >>"$SUMMARY"
  echo "gpu_check: $CUDA_STATUS; nothing was checked. Results: $SUMMARY" | tee -a "$LOG"
  exit 3
fi

# step NAME TIMEOUT_S COMMAND... : run under `timeout` (capped by the budget left), log its output, record it.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped: budget of ${BUDGET_S} s spent | 0 |" >>"$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "===== $name (timeout ${limit} s): $*" >>"$LOG"
  local t0 rc
  t0=$(date +%s)
  # through bash -c, so a step may be one of the functions below (exported); setsid-free: timeout kills it
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) result
  case $rc in
    0) result="passed" ;;
    124 | 137) result="TIMED OUT after ${limit} s"; FAILED=1 ;;
    *) result="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  echo "| $name | $result | $took |" >>"$SUMMARY"
  echo "===== $name: $result in ${took} s" | tee -a "$LOG"
}

env_report() {
  nvidia-smi
  nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm --format=csv
  "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
  "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|pytest|pytest-xdist|hypothesis|numpy|safetensors|tqdm|ninja|rwkv) '
  nvcc --version
  ninja --version
  sanitizer --version
  true
}

sanitizer() {
  local s
  for s in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    if [ -n "$s" ] && [ -x "$s" ]; then "$s" "$@"; return; fi
  done
  echo "compute-sanitizer not found"
  return 127
}

# sanitize TOOL: compute-sanitizer on the small run; passes only with "ran" and zero errors.
sanitize() {
  local out rc
  out="$(sanitizer --tool "$1" --error-exitcode 3 --kernel-name kns=wkv7 "$PY" tools/gpu_kernel_run.py sanitize 2>&1)"
  rc=$?
  printf '===== %s\n%s\n' "$1" "$out" >>"$SANLOG"
  printf '%s\n' "$out" | tail -20
  [ $rc -eq 0 ] && printf '%s' "$out" | grep -q '^ran$' && printf '%s' "$out" | grep -q 'ERROR SUMMARY: 0 errors'
}

official_dir() {
  local d
  for d in "${RWKV_LM_DIR:-}" .gpu-carry/rwkv-lm; do
    if [ -n "$d" ] && [ -d "$d" ]; then echo "$d"; return; fi
  done
}

export -f env_report sanitizer sanitize
export PY SANLOG
step env 60 env_report
step build 180 "$PY" tools/gpu_kernel_run.py build
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)  # pytest-xdist is on the device image; serial without it
step pytest 200 env RWKVSLICE_TEST_DEVICE=cuda RWKVSLICE_TEST_DTYPE=bfloat16 RWKVSLICE_REQUIRE_CUDA=1 \
  "$PY" -m pytest tests/runtime -m "gpu or not slow" -k "not compute_sanitizer" -q -p no:cacheprovider \
  "${XDIST[@]}" --timeout 120 --junitxml="$RESULTS/pytest.xml"
step memcheck 60 sanitize memcheck
step racecheck 60 sanitize racecheck
OFFICIAL="$(official_dir)"
step bench-kernel 120 "$PY" benchmarks/bench_kernel.py ${OFFICIAL:+--rwkv-lm "$OFFICIAL"} --rounds 10 \
  --out "$RESULTS/bench-kernel.md"
step bench-train 150 "$PY" benchmarks/bench_train.py --gpu-only --rounds 5 --out "$RESULTS/bench-train.md"
step synccheck 45 sanitize synccheck
step initcheck 45 sanitize initcheck

echo >>"$SUMMARY"
echo "Total: $(($(date +%s) - START)) s. Official kernel source: ${OFFICIAL:-not carried (bench-kernel ran without it)}." >>"$SUMMARY"
grep -E '^(build:|selfcheck|addmm|chunked loss grad_W)' "$LOG" | sed 's/^/- /' >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
