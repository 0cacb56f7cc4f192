# How the files of this folder were made (2-core EPYC, no GPU; nvcc 13.0; cuobjdump and
# nvdisasm from the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels).
set -x
cd "$(git rev-parse --show-toplevel)"
R=bench/results/cpu-2026-11-30
PY=${PYTHON:-/work/main/.venv/bin/python}
# SASS statistics of this checkout, sm_90 (every dtype), and of the commit the issue measured.
$PY bench/sass_stats.py --arch 90 --out $R/sass_stats_sm90.txt > /dev/null
mkdir -p /tmp/fused_ce_base && git archive 35e0af4 | tar -x -C /tmp/fused_ce_base
$PY bench/sass_stats.py --arch 90 --dtypes bfloat16,float --root /tmp/fused_ce_base --source-label "commit 35e0af4 (the issue's build)" \
  --out $R/sass_stats_sm90_base_35e0af4.txt > /dev/null
# The CUDA kernels under the emulator (every variant and option combination).
PYTHONPATH=. $PY -m pytest tests/test_cuda_emulated.py -q --durations=10 2>&1 | tail -13 > $R/test_cuda_emulated.log  # (with a header line)
