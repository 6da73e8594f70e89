#!/usr/bin/env bash
# Build the C++ runtime (edgeq-run) into runtime/cpp/build/<variant>/: x86_64, x86_64-asan and aarch64.
#
# Headers come from the apache-tvm-ffi wheel in .venv/; TVM's runtime libraries from the apache-tvm wheels:
# this machine's for x86_64, and the manylinux aarch64 wheels (downloaded once by pip into
# runtime/cpp/build/aarch64/wheels) for aarch64, cross-compiled with aarch64-linux-gnu-g++.
# Usage: scripts/build_runtime.sh [x86_64] [x86_64-asan] [aarch64]   (default: all three)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python=.venv/bin/python
source_dir=runtime/cpp
tvm_version=0.27.0.post1
ffi_version=0.1.14.post1
include_dir="$($python -m tvm_ffi.config --includedir)"
dlpack_dir="$($python -m tvm_ffi.config --dlpack-includedir)"

stage_host_libraries() {  # $1: folder to hold libtvm_ffi.so and libtvm_runtime.so
    mkdir -p "$1"
    cp -f "$($python -m tvm_ffi.config --libfiles)" "$1/libtvm_ffi.so"
    cp -f "$($python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("tvm").submodule_search_locations[0]) / "lib" / "libtvm_runtime.so")')" "$1/libtvm_runtime.so"
}

stage_aarch64_libraries() {  # $1: folder to hold the aarch64 libtvm_ffi.so and libtvm_runtime.so
    local wheels="$source_dir/build/aarch64/wheels"
    mkdir -p "$1" "$wheels"
    if ! ls "$wheels"/apache_tvm-*.whl >/dev/null 2>&1 || ! ls "$wheels"/apache_tvm_ffi-*.whl >/dev/null 2>&1; then
        echo "build_runtime: downloading the aarch64 wheels of apache-tvm $tvm_version and apache-tvm-ffi $ffi_version"
        $python -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
            --python-version 3.11 -d "$wheels" "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version"
    fi
    $python - "$wheels" "$1" <<'PY'
import pathlib, sys, zipfile
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wanted = {"tvm/lib/libtvm_runtime.so": "libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so": "libtvm_ffi.so"}
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name in wanted:
                (out / wanted[name]).write_bytes(archive.read(name))
missing = [v for v in wanted.values() if not (out / v).exists()]
if missing:
    sys.exit(f"build_runtime: {missing} not found in the aarch64 wheels in {wheels}")
PY
}

build() {  # $1: variant
    local variant="$1" build_dir="$source_dir/build/$1" libraries="$source_dir/build/$1/tvm-lib"
    local options=()
    case "$variant" in
        x86_64) stage_host_libraries "$libraries" ;;
        x86_64-asan) stage_host_libraries "$libraries"; options+=(-DEDGEQ_ASAN=ON) ;;
        aarch64)
            stage_aarch64_libraries "$libraries"
            options+=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++) ;;
        *) echo "build_runtime: unknown variant $variant (x86_64, x86_64-asan, aarch64)" >&2; exit 2 ;;
    esac
    echo "build_runtime: building $variant"
    cmake -S "$source_dir" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DTVM_FFI_INCLUDE_DIR="$include_dir" \
        -DDLPACK_INCLUDE_DIR="$dlpack_dir" -DTVM_LIBRARY_DIR="$repo/$libraries" "${options[@]}" >/dev/null
    cmake --build "$build_dir" -j "$(nproc)" >/dev/null
}

variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(x86_64 x86_64-asan aarch64)
for variant in "${variants[@]}"; do
    build "$variant"
done
