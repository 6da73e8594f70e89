#!/usr/bin/env bash
# Install edgeq and everything it needs: Debian packages (as root, when missing) and .venv/ at the repository root.
#
# Idempotent and quick the second time: the Python part is skipped when .venv/ was made from the same
# pyproject files and this script.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"

# Debian packages: the venv module, a C++ toolchain and CMake (the C++ runtime), the aarch64 cross compiler
# (aarch64 artifacts and runtime), qemu-user (running aarch64 programs here), Graphviz (the visualizer's layout)
# and Chromium (the tests render the HTML report in it, headless).
missing=()
"$python" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v cmake >/dev/null || missing+=(cmake)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v dot >/dev/null || missing+=(graphviz)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "edgeq install: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "edgeq install: missing Debian packages: ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
        exit 1
    fi
fi

build_runtime() {  # the C++ runtime for this machine and for aarch64 (incremental: quick when up to date)
    "$repo/scripts/build_runtime.sh" x86_64 aarch64
}

stamp=".venv/.edgeq-install-stamp"
wanted="$(cat pyproject.toml runtime/python/pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x .venv/bin/python ]; then
    build_runtime
    exit 0
fi

echo "edgeq install: setting up .venv/ (the first time takes a minute: torch is large)"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]" -e runtime/python
# The TOSA tools (tosa_serializer writes TOSA 1.0 flatbuffers; tosa_reference_model runs them as the specification
# defines) pin numpy<2.2 and flatbuffers==25.2.10, which clash with edgeq's numpy 2.x and ONNX Runtime's newer
# flatbuffers. They are installed without their pins (--no-deps), with the pure-Python packages they import beside
# numpy, flatbuffers and ml_dtypes (which edgeq's dependencies bring): semver, and jsonschema (their schema checks).
# Measured: the serializer and the reference model import and run with numpy 2.4.6 and flatbuffers 25.12.19.
.venv/bin/python -m pip install --quiet "semver==3.0.4" "jsonschema>=4.24"
.venv/bin/python -m pip install --quiet --no-deps "tosa-tools==2026.8.0"
echo "$wanted" > "$stamp"
build_runtime
echo "edgeq install: done ($(.venv/bin/python -c 'import torch, edgeq; print("edgeq", edgeq.__version__, "torch", torch.__version__)'))"
