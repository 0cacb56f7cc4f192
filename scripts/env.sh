# Sourced by scripts/test.sh and scripts/bench.sh: creates (once) a virtual
# environment in .venv with what fused_ce needs, and builds fused_ce into it.
# Needs Python >= 3.10 and a C++ compiler; the CUDA kernels are built too when
# torch is a CUDA build and a CUDA toolkit (nvcc) is found.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "fused_ce needs Python >= 3.10"'
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# The build requirements (pyproject.toml's [build-system]) first: the build runs against
# the installed torch (--no-build-isolation), then fused_ce with the test, Hugging Face,
# plot and benchmark extras. MAX_JOBS bounds the parallel compiles.
python -m pip install -q "torch>=2.4" ninja
MAX_JOBS=${MAX_JOBS:-$(nproc)} python -m pip install -q --no-build-isolation -e ".[test,hf,plot,bench]"
python -c 'import fused_ce, torch; print(f"fused_ce built: torch {torch.__version__}, CUDA kernels: {fused_ce.cuda_kernels_available()}, GPU visible: {torch.cuda.is_available()}")'
