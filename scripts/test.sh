#!/usr/bin/env bash
# Install edgeq into .venv/ (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/install.sh"
cd "$repo"
exec .venv/bin/python -m pytest "$@"
