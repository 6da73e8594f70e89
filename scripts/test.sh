#!/usr/bin/env bash
# Install edgeq into .venv/ (if needed) and run the whole test suite, the whole-flow tests (marked flow) included,
# one pytest-xdist worker per core (at most 4; EDGEQ_TEST_WORKERS overrides), a test file per worker at a time so
# each file's module fixtures are made once. Extra arguments go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/install.sh"
cd "$repo"
cores="$(nproc)"
workers="${EDGEQ_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
exec .venv/bin/python -m pytest --flow --numprocesses "$workers" --dist loadfile "$@"
