#!/usr/bin/env bash
# Sets up .venv, builds fused_ce and runs the benchmark on the default device
# (CUDA if present, else CPU). Extra arguments go to `python bench/run.py`.
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python bench/run.py "$@"
