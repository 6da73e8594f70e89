"""Measuring a compiled artifact on this machine: the latency of ``main``, and the time of every kernel call.

Kernel calls are timed with the Relax VM's instrument hook (a callback before and after every call), in a run of
their own; the total latency is timed without the hook. Each figure is the median over ``runs`` runs. Part of
the hook's own cost (a Python callback) falls inside every timed call: what it adds to a kernel that does next
to nothing (:func:`hook_seconds`, about 1-2 us here) is subtracted from each call's time (never below 0).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.compile.compiled_graph import CompiledGraph, load_compiled_graph
from edgeq.compile.kernel_map import KernelCall, kernel_calls, op_calls


@dataclass(frozen=True)
class TimedCall:
    """One kernel call of a run: the region (VM function) calling it, its index among the region's kernel calls,
    the kernel, and its median time in seconds (less the hook's share, :func:`hook_seconds`)."""

    region: str
    index: int
    kernel: str
    seconds: float


@dataclass(frozen=True)
class Measurement:
    """What one artifact takes on this machine.

    Attributes:
        latency_s: median time of ``main`` (seconds).
        calls: every kernel call of ``main``, in order.
        ops: the kernel calls each op of the compiled graph runs in, by op name (ops that share a fused kernel
            share its call; a bilinear resize runs in several).
    """

    latency_s: float
    calls: list[TimedCall]
    ops: dict[str, tuple[TimedCall, ...]]

    def op_seconds(self, name: str) -> float | None:
        """The time of the kernel calls op ``name`` runs in (None when it has none)."""
        calls = self.ops.get(name)
        return sum(call.seconds for call in calls) if calls else None


def _inputs(graph: CompiledGraph, seed: int = 0) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    arrays = []
    for name in graph.inputs:
        tensor = graph.tensors[name]
        if tensor.dtype.startswith("float"):
            arrays.append(generator.standard_normal(tensor.shape).astype(tensor.dtype))
        else:
            info = np.iinfo(tensor.dtype)
            arrays.append(generator.integers(max(info.min, -128), min(info.max, 127), tensor.shape, dtype=tensor.dtype, endpoint=True))
    return arrays


def measurement_threads() -> int:
    """The threads an artifact is measured on: ``TVM_NUM_THREADS``, else every core this process may use (the
    runtimes' default). Read before TVM sizes a thread pool itself, which pins this thread to one core."""
    from edgeq_runtime.vm import available_cores

    return int(os.environ.get("TVM_NUM_THREADS") or len(available_cores()))


def measure(artifact: str | Path, runs: int = 5) -> Measurement:
    """Run ``artifact`` on this machine ``runs`` times (after one warm-up run) and time it.

    Raises:
        CompiledGraphError: the artifact cannot be read.
    """
    import tvm
    from edgeq_runtime import Artifact
    from edgeq_runtime.vm import use_threads
    from tvm import relax

    graph = load_compiled_graph(artifact)
    use_threads(measurement_threads())  # TVM's pool as the runtimes set it up: every core shared, no thread pinned
    with tempfile.TemporaryDirectory(prefix="edgeq-measure-") as folder:
        library = Path(folder) / "model.so"
        library.write_bytes(Artifact.read(artifact).members["model.so"])
        module = tvm.runtime.load_module(str(library))
        calls_of = kernel_calls(module["as_text"]())
        vm = relax.VirtualMachine(module, tvm.cpu())
        arguments = [tvm.runtime.tensor(a) for a in _inputs(graph)]
        main = vm["main"]
        main(*arguments)
        totals = []
        for _ in range(runs):
            started = time.perf_counter()
            main(*arguments)
            totals.append(time.perf_counter() - started)
        samples = _instrumented_times(vm, arguments, calls_of, runs)
    hook = hook_seconds()
    calls = [
        TimedCall(region, index, calls_of[region][index].kernel, max(statistics.median(times) - hook, 0.0))
        for (region, index), times in samples.items()
    ]
    by_place = {(c.region, c.index): c for c in calls}
    ops = {
        name: tuple(by_place[(region, index)] for index in indices if (region, index) in by_place)
        for name, (region, indices) in op_calls(calls_of, graph).items()
    }
    return Measurement(statistics.median(totals), calls, ops)


def _instrumented_times(vm: Any, arguments: list[Any], calls_of: dict[str, list[KernelCall]], runs: int) -> dict[tuple[str, int], list[float]]:
    """(region, kernel call index) -> the call's timed intervals in ``runs`` runs of ``vm``'s ``main``."""
    samples: dict[tuple[str, int], list[float]] = {}
    events: list[tuple[str, bool, float]] = []

    def instrument(_function: object, symbol: str, before: bool, _result: object, *_args: object) -> int:
        events.append((symbol, before, time.perf_counter()))
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs):
        events.clear()
        vm["main"](*arguments)
        for key, seconds in _call_times(events, calls_of).items():
            samples.setdefault(key, []).append(seconds)
    return samples


@functools.cache
def hook_seconds() -> float:
    """What the instrument hook adds to a timed call on this machine: the median timed interval of a kernel that
    does next to nothing (the sum of two one-element tensors), over 200 calls."""
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder()
    value = relax.Var("x", relax.TensorType([1], "int32"))
    with builder.function("main", [value]):
        with builder.dataflow():
            total = builder.emit_output(relax.op.add(value, value))
        builder.emit_func_output(total)
    executable = tvm.compile(relax.transform.LegalizeOps()(builder.get()), target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    samples = _instrumented_times(vm, [tvm.runtime.tensor(np.zeros(1, np.int32))], kernel_calls(executable.as_text()), 200)
    return statistics.median(seconds for times in samples.values() for seconds in times)


def _call_times(events: list[tuple[str, bool, float]], calls_of: dict[str, list[str]]) -> dict[tuple[str, int], float]:
    """(region, kernel call index) -> seconds, from the instrument's before/after events of one run."""
    times: dict[tuple[str, int], float] = {}
    stack: list[tuple[str, float]] = []
    counters: dict[str, int] = {}
    regions = ["main"]  # the entry function is not itself a call
    for symbol, before, at in events:
        if symbol.startswith("vm."):
            continue
        if symbol in calls_of:  # a VM function (main, a region)
            if before:
                regions.append(symbol)
            else:
                regions.pop()
            continue
        if before:
            stack.append((symbol, at))
        else:
            _, started = stack.pop()
            region = regions[-1]
            index = counters.get(region, 0)
            counters[region] = index + 1
            times[(region, index)] = at - started
    return times
