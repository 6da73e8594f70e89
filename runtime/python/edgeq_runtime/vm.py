"""TVM's Relax virtual machine through ``tvm_ffi`` and ``libtvm_runtime.so``: no TVM compiler in the process."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

_RUNTIME_VARIABLE = "EDGEQ_TVM_RUNTIME"
_CPU = 1  # DLPack's kDLCPU
_POOLED_ALLOCATOR = 2
_loaded: ctypes.CDLL | None = None


class RuntimeLibraryError(Exception):
    """TVM's runtime library cannot be found or loaded."""


def runtime_library() -> Path:
    """Where ``libtvm_runtime.so`` is: ``$EDGEQ_TVM_RUNTIME``, else the installed apache-tvm wheel's copy."""
    explicit = os.environ.get(_RUNTIME_VARIABLE)
    if explicit:
        return Path(explicit)
    for entry in sys.path:  # the installed package's folder; nothing of the TVM compiler is imported or loaded
        candidate = Path(entry or ".") / "tvm" / "lib" / "libtvm_runtime.so"
        if candidate.is_file():
            return candidate
    raise RuntimeLibraryError(
        f"TVM's libtvm_runtime.so was not found: install apache-tvm, or set {_RUNTIME_VARIABLE} to its path"
    )


def _load_runtime() -> None:
    global _loaded
    if _loaded is None:
        # TVM's thread pool may otherwise start with a single thread on machines it misreads.
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
        import tvm_ffi  # noqa: F401 - loads libtvm_ffi.so, which libtvm_runtime.so links against

        path = runtime_library()
        try:
            _loaded = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise RuntimeLibraryError(f"{path}: cannot load TVM's runtime ({error})") from None


def load_vm(library: Path) -> Any:
    """The ``main`` function of the Relax VM executable in the shared library ``library``."""
    _load_runtime()
    import tvm_ffi

    module = tvm_ffi.load_module(str(library))
    vm = module["vm_load_executable"]()
    vm["vm_initialization"](_CPU, 0, _POOLED_ALLOCATOR, _CPU, 0, _POOLED_ALLOCATOR)
    return vm["main"]
