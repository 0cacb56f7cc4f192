#!/usr/bin/env bash
# The GPU check, in one script, for the H200 test machine (no network; Python,
# torch, nvcc, ninja, pytest and compute-sanitizer preinstalled):
#
#   1. build fused_ce for sm_90 only;
#   2. bench/sanitize_cuda.py: every CUDA kernel against the CPU kernels, quickly;
#   3. the CUDA tests (--slow included: the > 2**31-element case);
#   4. the benchmark (python bench/run.py) with its JSON;
#   5. bench/kernel_times.py: each op's time against a copy of the logits, for every
#      kernel variant, and the dispatch-table lines it would write (kernel_times.txt);
#   6. compute-sanitizer memcheck and initcheck over bench/sanitize_cuda.py, racecheck
#      over its --quick cases (racecheck is the slowest); then memcheck over --quick with
#      each variant forced (FUSED_CE_CUDA_VARIANT), single_read also at its shared-memory
#      and cluster boundaries;
#   7. the --step, --plot and --linear benchmarks (--linear with Liger-Kernel and
#      cut-cross-entropy when their wheels are carried).
#
# Everything goes to $OUT (default ./out): gpu_check.log (the whole raw log, every
# step's output in it), kernel_times.txt, the benchmarks' JSON and the plots. The steps run in that
# order of value under one time budget, GPU_CHECK_BUDGET seconds (default 540): each
# step's own limit is cut to what is left, and a step that would start with under 20 s
# left is skipped (and recorded). A failing step is recorded and the next one still
# runs. The exit status is non-zero if any step failed or was skipped.
# GPU_CHECK_SKIP="name ..." leaves the named steps out (e.g. "bench-linear").
#
# Dry run on a machine without a GPU: `GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh`
# (builds and runs everything it can, with the benchmark's --quick shapes).
# Wheels for comparisons (liger-kernel, cut-cross-entropy) are installed from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET:-540}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
failed=()

say() { echo "== $(date -u +%H:%M:%S) [${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: runs CMD with a time limit (cut to the budget left), its
# output into the raw log.
step() {
  local name=$1 limit=$2
  shift 2
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    say "$name: left out (GPU_CHECK_SKIP)"
    return 0
  fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    say "$name: skipped, ${left}s of the budget left"
    failed+=("$name(skipped)")
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  say "$name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - start))s"
  [ "$rc" = 0 ] || failed+=("$name(rc=$rc)")
  return "$rc"
}

say "machine"
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$PY" -c 'import torch, platform; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  git rev-parse --short HEAD 2>/dev/null || true
  git status --short 2>/dev/null || true
} >>"$LOG" 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. Build in place (no pip needed: the machine is offline), sm_90 only unless overridden.
if [ "$DRY_RUN" = 1 ]; then export FUSED_CE_CUDA=${FUSED_CE_CUDA:-auto}; else export FUSED_CE_CUDA=1; fi
if ! step build 300 "$PY" setup.py build_ext --inplace; then
  say "build failed: nothing else can run"
  exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import fused_ce, torch; print("CUDA kernels:", fused_ce.cuda_kernels_available(), "GPU:", torch.cuda.is_available())' >>"$LOG" 2>&1
DEVICE=cuda
[ "$DRY_RUN" = 1 ] && DEVICE=cpu

# 2. Every kernel once against the CPU kernels: the quickest signal.
step kernels 60 "$PY" bench/sanitize_cuda.py --device "$DEVICE"

# 3. The CUDA tests (every test parametrised over devices has a cuda case). The CPU
#    emulation of the CUDA kernels is left out: the real ones run here. pytest-xdist
#    spreads them over processes where it is installed.
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
TEST_FILTER=cuda
[ "$DRY_RUN" = 1 ] && TEST_FILTER="cuda or test_properties"
step tests 180 "$PY" -m pytest tests -q -k "$TEST_FILTER" --slow --ignore=tests/test_cuda_emulated.py -p no:cacheprovider "${XDIST[@]}"

# 4. The benchmark, with its JSON.
QUICK=()
[ "$DRY_RUN" = 1 ] && QUICK=(--quick)
step bench 150 "$PY" bench/run.py --json "$OUT/bench.json" --no-progress "${QUICK[@]}"

# 5. Each op's time against a copy of the logits (where the time of a training call goes),
#    for every variant (each in its own process: the variable is read once), at the shapes
#    of the issue: 256 KB rows (a cluster of 3 for single_read) and 512 KB rows (5).
SHAPES=16384x128256,8192x256000
[ "$DRY_RUN" = 1 ] && SHAPES=256x4096
step kernel-times 150 bash -c "set -o pipefail; '$PY' bench/kernel_times.py --device '$DEVICE' --shapes $SHAPES \
  | tee '$OUT/kernel_times.txt'"

# 6. compute-sanitizer over bench/sanitize_cuda.py (small shapes: every access is instrumented).
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck initcheck racecheck; do
    cases=()
    [ "$tool" = racecheck ] && cases=(--quick)
    step "sanitizer-$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
      "$PY" bench/sanitize_cuda.py --device "$DEVICE" "${cases[@]}"
  done
  # Every variant, every launch forced to it (where it can take the launch); single_read
  #  also at its boundaries (one CTA, two, the largest cluster, past it).
  for variant in stream32 stream256 stream512 stream1024 single_read; do
    extra=()
    [ "$variant" = single_read ] && extra=(--single-read-boundaries)
    step "sanitizer-memcheck-$variant" 90 env FUSED_CE_CUDA_VARIANT=$variant compute-sanitizer --tool memcheck \
      --error-exitcode 9 --target-processes all "$PY" bench/sanitize_cuda.py --device "$DEVICE" --quick "${extra[@]}"
  done
  step sanitizer-racecheck-single_read 120 env FUSED_CE_CUDA_VARIANT=single_read compute-sanitizer --tool racecheck \
    --error-exitcode 9 --target-processes all "$PY" bench/sanitize_cuda.py --device "$DEVICE" --quick
else
  say "compute-sanitizer not found: skipped"
  [ "$DRY_RUN" = 1 ] || failed+=("sanitizer(missing)")
fi

# 7. The other benchmarks.
step bench-step 60 "$PY" bench/run.py --step --json "$OUT/bench_step.json" --no-progress "${QUICK[@]}"
step bench-plot 90 "$PY" bench/run.py --plot "$OUT" --json "$OUT/bench_plot.json" --no-progress "${QUICK[@]}"
step bench-linear 90 "$PY" bench/run.py --linear --json "$OUT/bench_linear.json" --no-progress "${QUICK[@]}"

if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all steps passed"
