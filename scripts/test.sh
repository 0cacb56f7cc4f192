#!/usr/bin/env bash
# Sets up .venv, builds fused_ce and runs the test suite (CUDA tests are skipped without a GPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k probs`.
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest tests -q "$@"
