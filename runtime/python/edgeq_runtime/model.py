"""Model: a loaded artifact, run from numpy arrays, from any number of threads at once."""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq_runtime.artifact import Artifact, ArtifactError
from edgeq_runtime.cpu import missing_features
from edgeq_runtime.manifest import COMMAND_STREAMS_KEY
from edgeq_runtime.vm import available_cores, load_library, new_vm, pool_threads, thread_count, use_threads

_ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_PORTABLE_TARGETS = {"x86_64": "x86_64 (the x86-64-v3 baseline)", "aarch64": "aarch64"}
"""Per architecture, the target whose artifacts run on any CPU of it that edgeq supports."""

class CommandStreamWarning(UserWarning):
    """The artifact holds NPU command streams (an Arm Ethos-U build): they need the device; the runtime runs their
    regions' bit-exact simulation, compiled into the library."""


TVM_ALIGNMENT = 64
"""Bytes TVM's compiled kernels assume their tensors' data is aligned to (``kAllocAlignment`` in TVM's
``device_api.h``): they may use aligned vector loads on a program input, which crash on a less aligned array."""


def aligned(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous array whose data starts at a multiple of :data:`TVM_ALIGNMENT` bytes (itself
    when it already does, else a copy)."""
    array = np.ascontiguousarray(array)
    if array.ctypes.data % TVM_ALIGNMENT == 0:
        return array
    buffer = np.empty(array.nbytes + TVM_ALIGNMENT, dtype=np.uint8)
    start = -buffer.ctypes.data % TVM_ALIGNMENT
    copy = buffer[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


def _tensor(array: np.ndarray) -> Any:
    """A TVM tensor sharing the data of :func:`aligned` ``array``."""
    import tvm_ffi

    return tvm_ffi.from_dlpack(aligned(array), require_alignment=TVM_ALIGNMENT, require_contiguous=True)


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of the compiled program."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int | None
    quantizer: str | None = None
    """The library function that quantizes float values for this input as :meth:`quantize` does, in one parallel
    pass (an artifact compiled by an earlier edgeq has none: :meth:`quantize` then runs instead)."""

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> TensorInfo:
        quant = entry.get("quant")
        if quant is None:
            return cls(entry["name"], tuple(entry["shape"]), entry["dtype"], None, None, None)
        return cls(
            entry["name"],
            tuple(entry["shape"]),
            entry["dtype"],
            np.asarray(quant["scale"], dtype=np.float32),
            np.asarray(quant["zero_point"], dtype=np.int64),
            quant["axis"],
            entry.get("quantizer"),
        )

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def check(self, shape: Sequence[int], dtype: np.dtype) -> None:
        """Whether an array of ``shape`` and ``dtype`` is taken for this input: of its shape, and of its dtype (the
        program's integers, raw) or, for a quantized input, of any float dtype (then quantized).

        Raises:
            ValueError: it is not, naming the input (``input 'x' has shape [1, 3]; expected [2, 3]``).
        """
        if tuple(shape) != self.shape:
            raise ValueError(f"input '{self.name}' has shape {list(shape)}; expected {list(self.shape)}")
        if dtype != np.dtype(self.dtype) and not (self.quantized and np.issubdtype(dtype, np.floating)):
            floats = " (raw) or a float array to quantize" if self.quantized else ""
            raise ValueError(f"input '{self.name}' has dtype {dtype}; expected {self.dtype}{floats}")

    def _broadcast(self, values: np.ndarray, rank: int) -> np.ndarray:
        if values.size == 1 or self.axis is None:
            return values.reshape(())
        shape = [1] * rank
        shape[self.axis] = -1
        return values.reshape(shape)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """float -> integer: ``saturate(round_half_to_even(float32(x) / float32(s)) + zero_point)`` (NaN -> the zero
        point, as the C++ runtime)."""
        scale = self._broadcast(self.scale, values.ndim)
        zero = self._broadcast(self.zero_point, values.ndim)
        limits = np.iinfo(self.dtype)
        steps = np.divide(values, scale, dtype=np.float32)  # in float32 throughout, in place: 10x faster than int64
        np.rint(steps, out=steps)
        np.copyto(steps, 0, where=np.isnan(steps))  # NaN -> the zero point, as the C++ runtime
        steps += zero.astype(np.float32)  # exact below 2**24; beyond, the clamp gives the same limit
        np.clip(steps, limits.min, limits.max, out=steps)
        return steps.astype(self.dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """integer -> float32: ``float32(q - zero_point) * float32(s)``."""
        zero = self._broadcast(self.zero_point, values.ndim)
        return (values.astype(np.int64) - zero).astype(np.float32) * self._broadcast(self.scale, values.ndim)


@dataclass(frozen=True)
class Timing:
    """Latency of repeated runs, in milliseconds, and the threads they ran on (read back from TVM's pool)."""

    median_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    threads: int

    def __str__(self) -> str:
        """``latency over 20 runs on 2 thread(s): median 1.234 ms, min 1.200 ms`` (edgeq-run --bench prints the
        same)."""
        return f"latency over {self.runs} runs on {self.threads} thread(s): median {self.median_ms:.3f} ms, min {self.min_ms:.3f} ms"


def command_stream_note(target: str, regions: Sequence[str]) -> str:
    """What running an artifact with command streams means, in one line."""
    return (
        f"NPU target {target}: the command streams of {', '.join(regions)} need the NPU itself; here those regions "
        "run as their bit-exact simulation on the CPU"
    )


def host_arch() -> str:
    """This machine's architecture in the manifest's spelling."""
    return _ARCH_NAMES.get(platform.machine().lower(), platform.machine().lower())


def _check_runs_here(artifact: Artifact) -> None:
    """The artifact's library is built for this machine's architecture, and this CPU has every feature it may use
    (``library.cpu_features``; not checked where ``/proc/cpuinfo`` cannot be read, :mod:`edgeq_runtime.cpu`).

    Raises:
        ArtifactError: either is not so, saying what to do.
    """
    library = artifact.manifest["library"]
    arch = library["arch"]
    if arch != host_arch():
        raise ArtifactError(
            f"{artifact.path}: built for {arch}; this machine is {host_arch()} (run it under qemu-{arch} with "
            "the C++ runtime, edgeq run, or compile with --simulate for this machine)"
        )
    missing = missing_features(library["cpu_features"])
    if missing:
        raise ArtifactError(
            f"{artifact.path}: built for a CPU with {', '.join(missing)}, which this CPU lacks: recompile for target "
            f"{_PORTABLE_TARGETS[arch]} or on this machine"
        )


@dataclass(frozen=True)
class _Functions:
    """The functions of one thread's VM: ``main`` and each input's quantizer (None where it has none)."""

    main: Any
    quantizers: list[Any]


class Model:
    """A compiled edgeq model, ready to run on this machine.

    Threads: :meth:`run` and :meth:`benchmark` may be called from many threads at once on one model, with the
    results of one thread. A TVM Relax VM runs one call at a time, so each calling thread gets a VM of its own,
    made from the one loaded library on its first call (the weights are shared; each running call's tensors come
    from TVM's thread-safe pooled allocator) and dropped with the thread.

    Attributes:
        num_threads: how many threads its parallel kernels run on (default: every core this process may use).
    """

    def __init__(self, artifact: Artifact, folder: Path, num_threads: int) -> None:
        manifest = artifact.manifest
        self.num_threads = num_threads
        self.path = artifact.path
        self.manifest = manifest
        self.target: str = manifest["target"]["name"]
        self.arch: str = manifest["library"]["arch"]
        self.inputs = [TensorInfo.from_manifest(e) for e in manifest["inputs"]]
        self.outputs = [TensorInfo.from_manifest(e) for e in manifest["outputs"]]
        self.command_stream_regions: list[str] = [s["region"] for s in manifest.get(COMMAND_STREAMS_KEY, [])]
        """The NPU regions compiled to a command stream for the device (Vela's, for an Ethos-U target)."""
        self._cleanup = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        library = folder / manifest["library"]["member"]
        library.write_bytes(artifact.members[manifest["library"]["member"]])
        self._module = load_library(library)
        self._vm_lock = threading.Lock()  # threads make their VMs one at a time
        self._this_thread = threading.local()  # .functions: the calling thread's _Functions
        self._functions()  # this thread's VM now: a quantizer the library lacks is refused at load

    def _functions(self) -> _Functions:
        """The calling thread's VM functions, made on its first call.

        Raises:
            ArtifactError: the manifest names a quantizer the library lacks.
        """
        functions = getattr(self._this_thread, "functions", None)
        if functions is None:
            with self._vm_lock:
                vm = new_vm(self._module)
                functions = _Functions(vm["main"], [self._quantizer(vm, info) for info in self.inputs])
            self._this_thread.functions = functions
        return functions

    def _quantizer(self, vm: Any, info: TensorInfo) -> Any:
        """The library function quantizing float values for input ``info``, None if the artifact has none.

        Raises:
            ArtifactError: the manifest names a function the library lacks.
        """
        if info.quantizer is None:
            return None
        try:
            return vm[info.quantizer]
        except AttributeError:
            raise ArtifactError(f"{self.path}: the library has no function '{info.quantizer}' (input '{info.name}''s quantizer)") from None

    @classmethod
    def load(cls, path: str | Path, num_threads: int | None = None) -> Model:
        """Verify the artifact (manifest, checksums, architecture), then load its library.

        Args:
            path: the ``.edgeq`` file.
            num_threads: threads for inference, from 1 to the cores this process may use (default: all of them).

        Raises:
            ArtifactError: a damaged or foreign artifact, or one that cannot run here (:meth:`from_artifact`).
            ValueError: ``num_threads`` is not a whole number in that range.
        """
        return cls.from_artifact(Artifact.read(path), num_threads)

    @classmethod
    def from_artifact(cls, artifact: Artifact, num_threads: int | None = None) -> Model:
        """Load the library of an artifact already read and verified by :meth:`Artifact.read`.

        Raises:
            ArtifactError: the artifact is built for another architecture or for CPU features this CPU lacks, or
                the library lacks a quantizer the manifest names.
            ValueError: ``num_threads`` is not a whole number from 1 to the cores this process may use.
        """
        threads = len(available_cores()) if num_threads is None else thread_count(num_threads)
        _check_runs_here(artifact)
        folder = Path(tempfile.mkdtemp(prefix="edgeq-"))  # a fresh path: the loader caches libraries by path
        try:
            model = cls(artifact, folder, threads)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if model.command_stream_regions:
            warnings.warn(CommandStreamWarning(command_stream_note(model.target, model.command_stream_regions)), stacklevel=3)
        return model

    def close(self) -> None:
        """Delete the extracted library now (it is also deleted when the model is garbage collected)."""
        self._cleanup()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- running ---------------------------------------------------------------------------------------------
    def _prepare(
        self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray, quantizers: list[Any]
    ) -> list[Any]:
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            names = [i.name for i in self.inputs]
            unknown = sorted(set(inputs) - set(names))
            missing = [n for n in names if n not in inputs]
            if unknown or missing:
                raise ValueError(f"{self.path}: inputs {unknown} are unknown and {missing} missing (inputs: {names})")
            inputs = [inputs[n] for n in names]
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path}: {len(inputs)} input(s) given; the model takes {len(self.inputs)}")
        arguments = zip(self.inputs, quantizers, inputs)
        return [self._argument(info, quantizer, np.asarray(value)) for info, quantizer, value in arguments]

    def _argument(self, info: TensorInfo, quantizer: Any, value: np.ndarray) -> Any:
        """``value`` as the program takes it for input ``info``: integers as given, float values quantized (by the
        library's ``quantizer`` where it has one)."""
        try:
            info.check(value.shape, value.dtype)
        except ValueError as error:
            raise ValueError(f"{self.path}: {error}") from None
        if value.dtype == np.dtype(info.dtype):
            return _tensor(value)
        if quantizer is None:
            return _tensor(info.quantize(value))
        return quantizer(_tensor(value.astype(np.float32, copy=False)))  # float32 as quantize() divides

    def run(
        self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray, raw: bool = False
    ) -> dict[str, np.ndarray]:
        """Run once: inputs by name or position (float arrays are quantized per the manifest, arrays of the
        input's integer dtype are taken as already quantized); outputs by name, dequantized to float32 unless
        ``raw`` (then the integers the program computed). Parallel kernels run on :attr:`num_threads` threads.
        Safe to call from many threads at once (see the class docstring).

        Raises:
            ValueError: an unknown or missing name, a wrong shape or dtype (the message names the input).
            RuntimeLibraryError: TVM sized this thread's pool smaller before (see :func:`edgeq_runtime.vm.use_threads`).
        """
        use_threads(self.num_threads)
        functions = self._functions()
        arguments = self._prepare(inputs, functions.quantizers)
        result = functions.main(*arguments)
        results = [result] if len(self.outputs) == 1 else list(result)
        outputs = {}
        for info, value in zip(self.outputs, results):
            array = np.from_dlpack(value).copy()
            outputs[info.name] = array if raw or not info.quantized else info.dequantize(array)
        return outputs

    def benchmark(self, inputs: Any, warmup: int = 3, runs: int = 20) -> Timing:
        """Latency of ``run`` on ``inputs`` after ``warmup`` runs: median, minimum and mean over ``runs``, and the
        threads they ran on. Safe to call from many threads at once, like :meth:`run` (each then times its own
        runs, slowed by the others')."""
        for _ in range(warmup):
            self.run(inputs, raw=True)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self.run(inputs, raw=True)
            times.append((time.perf_counter() - started) * 1000)
        return Timing(statistics.median(times), min(times), statistics.fmean(times), runs, pool_threads())
