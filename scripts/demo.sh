#!/usr/bin/env bash
# Install edgeq into .venv/ (if needed) and run the main job: the staged QAT flow of examples/digits_qat.py
# (float -> calib -> qat -> int_infer -> compile) on scikit-learn's digits. Extra arguments go to the example.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/install.sh"
cd "$repo"
exec .venv/bin/python examples/digits_qat.py "$@"
