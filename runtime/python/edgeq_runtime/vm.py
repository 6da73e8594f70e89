"""TVM's Relax virtual machine through ``tvm_ffi`` and ``libtvm_runtime.so``: no TVM compiler in the process.

Threads: TVM keeps one thread pool per calling thread, sized when that thread first runs a parallel kernel. Its
global function ``runtime.config_threadpool(mode, count, cpus)`` sizes the pool to ``cpus`` if the thread has none
yet, lets workers run on any of ``cpus`` (mode ``kSpecifyThreadShareAllCore``) and makes parallel kernels split
their work ``count`` ways; ``runtime.NumThreads()`` reads that count back. :func:`use_threads` calls it once per
thread and count, before the thread's first run.

A pool worker that runs out of work yields the CPU ``TVM_THREAD_POOL_SPIN_COUNT`` times before it sleeps, read
once, when the process's first pool starts. TVM's default, 300000, kept a core busy for about 70 ms after every
inference here; :func:`bound_pool_spinning` lowers it to :data:`POOL_SPIN_COUNT` unless the variable is set.
"""

from __future__ import annotations

import ctypes
import functools
import numbers
import os
import sys
import threading
from pathlib import Path
from typing import Any

_RUNTIME_VARIABLE = "EDGEQ_TVM_RUNTIME"
_CPU = 1  # DLPack's kDLCPU
_POOLED_ALLOCATOR = 2
_SHARE_ALL_CORES = -3  # TVM's ThreadGroup::kSpecifyThreadShareAllCore
_SPIN_VARIABLE = "TVM_THREAD_POOL_SPIN_COUNT"
POOL_SPIN_COUNT = 20000
"""Yields of an idle pool worker before it sleeps (runtime/cpp/src/model.cc has the same): about 5 ms here (Intel
Xeon VM, 0.25 us per yield), which bridges the gaps between one inference's kernels, then the core is free again.
Never spinning was 3x slower (a sleeping worker is woken for every parallel kernel)."""
_loaded: ctypes.CDLL | None = None
_this_thread = threading.local()  # .threads: the count the calling thread's pool was last set to


class RuntimeLibraryError(Exception):
    """TVM's runtime library cannot be found or loaded, or its thread pool cannot be set up."""


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
        import tvm_ffi  # noqa: F401 - loads libtvm_ffi.so, which libtvm_runtime.so links against

        path = runtime_library()
        try:
            _loaded = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            raise RuntimeLibraryError(f"{path}: cannot load TVM's runtime ({error})") from None


def load_library(library: Path) -> Any:
    """The TVM module of the shared library ``library``: the compiled executable, from which :func:`new_vm` makes
    virtual machines."""
    _load_runtime()
    import tvm_ffi

    return tvm_ffi.load_module(str(library))


def new_vm(module: Any) -> Any:
    """A fresh Relax VM of the executable in ``module`` (its functions by name: ``vm["main"]``).

    A VM runs one call at a time (its registers and call frames are its own): threads calling at once need a VM
    each. VMs of one module share its constants (the weights); the tensors of a call come from TVM's pooled CPU
    allocator, one per process, which is thread-safe and keeps freed buffers for the next call.
    """
    vm = module["vm_load_executable"]()
    vm["vm_initialization"](_CPU, 0, _POOLED_ALLOCATOR, _CPU, 0, _POOLED_ALLOCATOR)
    return vm


@functools.cache
def available_cores() -> tuple[int, ...]:
    """The ids of the CPU cores this process may run on, read once: TVM pins a thread whose pool it sizes itself."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return tuple(range(os.cpu_count() or 1))


def thread_count(value: Any) -> int:
    """``value`` as a thread count: a whole number from 1 to the cores this process may run on.

    Raises:
        ValueError: anything else, with the allowed range.
    """
    cores = len(available_cores())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= cores:
        raise ValueError(f"num_threads must be a whole number from 1 to {cores} (the cores this process may use); got {value!r}")
    return int(value)


def bound_pool_spinning() -> None:
    """Idle pool workers spin :data:`POOL_SPIN_COUNT` yields before sleeping, unless ``TVM_THREAD_POOL_SPIN_COUNT``
    is set; effective only before the process's first TVM thread pool starts."""
    os.environ.setdefault(_SPIN_VARIABLE, str(POOL_SPIN_COUNT))


def use_threads(count: int) -> None:
    """Make parallel kernels run on ``count`` threads when called from this thread.

    Raises:
        RuntimeLibraryError: this thread's pool was sized smaller by an earlier use of TVM.
    """
    if getattr(_this_thread, "threads", None) == count:
        return
    import tvm_ffi

    cores = available_cores()
    bound_pool_spinning()
    tvm_ffi.get_global_func("runtime.config_threadpool")(_SHARE_ALL_CORES, count, [str(c) for c in cores])
    if pool_threads() != count:
        raise RuntimeLibraryError(
            f"TVM's thread pool of this thread runs {pool_threads()} thread(s), not {count}: TVM sized it before "
            f"edgeq_runtime ran here (set TVM_NUM_THREADS={len(cores)} before the process first uses TVM)"
        )
    _this_thread.threads = count


def pool_threads() -> int:
    """How many threads parallel kernels started from this thread run on (TVM's ``runtime.NumThreads``)."""
    import tvm_ffi

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())
