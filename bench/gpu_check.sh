#!/usr/bin/env bash
# The GPU check, in one script, for the H200 test machine (no network; Python,
# torch, nvcc, ninja, pytest and compute-sanitizer preinstalled):
#
#   1. build fused_ce for sm_90 only;
#   2. run the CUDA tests;
#   3. run compute-sanitizer (memcheck, then racecheck and initcheck) over a small
#      CUDA test subset;
#   4. run the benchmark (python -m fused_ce.bench) with its JSON.
#
# Everything goes to $OUT (default ./out): gpu_check.log (the whole raw log),
# build.log, tests.log, sanitizer.log, bench.log and bench.json. Each step has its
# own time limit so the whole run ends within about 8 minutes; a failing step is
# recorded and the next one still runs. The exit status is non-zero if any step failed.
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
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
failed=()

say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

# step NAME SECONDS LOGFILE CMD...: runs CMD with a time limit, its output into
# LOGFILE and the raw log.
step() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  say "$name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$logfile" >>"$LOG"
  local rc=${PIPESTATUS[0]}
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
} 2>&1 | tee -a "$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. Build in place (no pip needed: the machine is offline), sm_90 only unless overridden.
if [ "$DRY_RUN" = 1 ]; then export FUSED_CE_CUDA=${FUSED_CE_CUDA:-auto}; else export FUSED_CE_CUDA=1; fi
if ! step build 300 build.log "$PY" setup.py build_ext --inplace; then
  say "build failed: nothing else can run"
  exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import fused_ce, torch; print("CUDA kernels:", fused_ce.cuda_kernels_available(), "GPU:", torch.cuda.is_available())' 2>&1 | tee -a "$LOG"

# 2. The CUDA tests (every test parametrised over devices has a cuda case). The CPU
#    emulation of the CUDA kernels is left out: the real ones run here.
step tests 180 tests.log "$PY" -m pytest tests -q -k cuda --ignore=tests/test_cuda_emulated.py -p no:cacheprovider \
  --junitxml="$OUT/tests.xml"

# 3. compute-sanitizer over small CUDA subsets (small shapes: every access is
#    instrumented): memcheck over the op tests, racecheck and initcheck over opcheck
#    of every op (each op's kernels, every mapping of threads to rows).
SANITIZER_RUNS=(
  "memcheck 120 tests/test_ops.py"
  "racecheck 60 tests/test_extras.py"
  "initcheck 60 tests/test_extras.py"
)
if command -v compute-sanitizer >/dev/null 2>&1; then
  : >"$OUT/sanitizer.log"
  for run in "${SANITIZER_RUNS[@]}"; do
    read -r tool limit file <<<"$run"
    filter=cuda
    [ "$tool" = memcheck ] || filter="cuda and opcheck"
    step "sanitizer-$tool" "$limit" "sanitizer-$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      --target-processes all "$PY" -m pytest "$file" -q -x -k "$filter" -p no:cacheprovider
    cat "$OUT/sanitizer-$tool.log" >>"$OUT/sanitizer.log"
    rm -f "$OUT/sanitizer-$tool.log"
  done
else
  say "compute-sanitizer not found: skipped"
  [ "$DRY_RUN" = 1 ] || failed+=("sanitizer(missing)")
fi

# 4. The benchmark, with its JSON.
BENCH_ARGS=(--json "$OUT/bench.json" --no-progress)
[ "$DRY_RUN" = 1 ] && BENCH_ARGS+=(--quick)
step bench 300 bench.log "$PY" -m fused_ce.bench "${BENCH_ARGS[@]}"

if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all steps passed"
