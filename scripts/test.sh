#!/usr/bin/env bash
# Install edgeq into .venv/ (if needed) and run the whole test suite, the whole-flow tests (marked flow) included.
# Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/install.sh"
cd "$repo"
exec .venv/bin/python -m pytest --flow "$@"
