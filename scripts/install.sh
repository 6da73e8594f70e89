#!/usr/bin/env bash
# Install edgeq and everything it needs into .venv/ at the repository root.
#
# Idempotent and quick the second time: it does nothing when .venv/ was made from the same pyproject.toml and
# this script. As root, it installs the Debian packages it needs when they are missing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
stamp=".venv/.edgeq-install-stamp"
wanted="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x .venv/bin/python ]; then
    exit 0
fi

# Debian packages: the venv module (Debian splits it out of python3). Installed only as root and only if missing.
if ! "$python" -c "import venv, ensurepip" 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "edgeq install: installing python3-venv (apt-get)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "edgeq install: $python has no venv module; install python3-venv (as root: apt-get install python3-venv)" >&2
        exit 1
    fi
fi

echo "edgeq install: setting up .venv/ (the first time takes a minute: torch is large)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "$wanted" > "$stamp"
echo "edgeq install: done ($(.venv/bin/python -c 'import torch, edgeq; print("edgeq", edgeq.__version__, "torch", torch.__version__)'))"
