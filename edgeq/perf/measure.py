"""Measuring a compiled artifact on this machine: the latency of ``main``, and the time of every kernel call.

Kernel calls are timed with the Relax VM's instrument hook (a callback before and after every call), in a run of
their own; the total latency is timed without the hook. Each figure is the median over ``runs`` runs. Part of
the hook's own cost (a Python callback, which receives every argument of the call as a Python object) falls
inside every timed call: what it adds to kernels that do next to nothing (:func:`hook_cost`: about 0.7 us, and
0.14 us more per argument here), timed between the runs, is subtracted from each call's time by its argument
count (never below 0). The plain runs (:data:`PLAIN_BURST` back to back), the timed runs and the hook's are
interleaved, so that a noisy machine's slow spells fall on all of them; :func:`measure_together` interleaves
several artifacts' rounds the same way.

Two short checks of the machine itself: :func:`probe_latency` times an artifact's ``main`` back to back for
0.15 s (whether the machine runs at the speed it was calibrated at), and :func:`others_share` how much
of the CPUs other processes used between two :func:`cpu_times` readings (whether the machine was busy).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.compile.compiled_graph import CompiledGraph, GraphOp, load_compiled_graph
from edgeq.compile.kernel_map import KernelCall, function_calls, kernel_calls


@dataclass(frozen=True)
class TimedCall:
    """One kernel call of a run: the region it ran for, its index among the kernel calls of the VM function running
    the region (its own, or an identical earlier region's), the kernel, and its median time in seconds (less the
    hook's share, :func:`hook_cost`)."""

    region: str
    index: int
    kernel: str
    seconds: float


@dataclass(frozen=True)
class Measurement:
    """What one artifact takes on this machine.

    Attributes:
        latency_s: median time of ``main`` (seconds).
        rounds_s: the median time of ``main`` in each round, in the order the rounds ran (seconds).
        calls: every kernel call of ``main``, in order.
        ops: the kernel calls each op of the compiled graph runs in (its ``calls`` in ``graph.json``), by op name
            (ops that share a fused kernel share its call; a bilinear resize runs in several).
    """

    latency_s: float
    rounds_s: list[float]
    calls: list[TimedCall]
    ops: dict[str, tuple[TimedCall, ...]]

    def places(self, name: str) -> tuple[tuple[str, int], ...]:
        """Where op ``name`` runs: the (region, index) of each kernel call it runs in (empty when it has none); ops
        fused into one kernel have the same places."""
        return tuple((call.region, call.index) for call in self.ops.get(name, ()))

    def op_seconds(self, name: str) -> float | None:
        """The time of the kernel calls op ``name`` runs in (None when it has none)."""
        calls = self.ops.get(name)
        return sum(call.seconds for call in calls) if calls else None

    def call_groups(self, graph: CompiledGraph) -> list[tuple[list[GraphOp], float]]:
        """The kernel calls of ``graph``'s ops (the graph measured) joined where ops tie them together (an op
        running in several calls, ops sharing one), each group with its ops in graph order (the first doing its
        main work) and its calls' total time (seconds)."""
        groups: list[tuple[set[tuple[str, int]], list[GraphOp]]] = []
        for op in graph.ops:
            places = set(self.places(op.name))
            if places:
                joined = [group for group in groups if group[0] & places]
                groups = [group for group in groups if not group[0] & places]
                groups.append((places.union(*(calls for calls, _ in joined)), [o for _, ops in joined for o in ops] + [op]))
        order = {op.name: index for index, op in enumerate(graph.ops)}
        seconds = {(call.region, call.index): call.seconds for call in self.calls}
        return [(sorted(ops, key=lambda op: order[op.name]), sum(seconds[place] for place in places)) for places, ops in groups]


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


PLAIN_BURST = 3
"""Runs of ``main`` timed back to back in each round of a measurement: as an application runs a model, with its
data in cache (a run right after the timed one and the hook's calls starts colder)."""


def measure(artifact: str | Path, runs: int = 5) -> Measurement:
    """Time ``artifact`` on this machine in ``runs`` rounds (after one warm-up run), each of :data:`PLAIN_BURST`
    plain runs, one run with every kernel call timed, and the hook's idle calls.

    Raises:
        CompiledGraphError: the artifact cannot be read.
    """
    return measure_together([artifact], runs)[0]


def measure_together(artifacts: Sequence[str | Path], runs: int = 5) -> list[Measurement]:
    """Time several artifacts as :func:`measure` times one, in the same rounds (each round measures every
    artifact in turn), so that a drifting machine's slow and fast spells fall on all of them alike.

    Raises:
        CompiledGraphError: an artifact cannot be read.
    """
    from edgeq_runtime.vm import use_threads

    use_threads(measurement_threads())  # TVM's pool as the runtimes set it up: every core shared, no thread pinned
    with tempfile.TemporaryDirectory(prefix="edgeq-measure-") as folder:
        subjects = [_Subject(artifact, Path(folder) / f"model{i}.so") for i, artifact in enumerate(artifacts)]
        hook = _HookSampler()
        for _ in range(runs):
            for subject in subjects:
                subject.round()
            hook.sample()
    cost = hook.cost()
    return [subject.result(cost) for subject in subjects]


class _Subject:
    """One artifact being measured: its VMs (plain, and with the instrument hook), inputs and samples."""

    def __init__(self, artifact: str | Path, library: Path) -> None:
        import tvm
        from tvm import relax

        self.graph, module, self.arguments = _loaded(artifact, library)
        text = module["as_text"]()
        self.calls_of = kernel_calls(text)
        self.running: dict[str, list[str]] = {}  # VM function -> the regions it runs, in order
        for region, function in zip(self.graph.regions, function_calls(text)):
            self.running.setdefault(function, []).append(region.name)
        plain, self.instrumented = (relax.VirtualMachine(module, tvm.cpu()) for _ in range(2))
        self.main = plain["main"]
        self.main(*self.arguments)
        self.rounds: list[list[float]] = []
        self.samples: dict[tuple[str, int], list[float]] = {}

    def round(self) -> None:
        """:data:`PLAIN_BURST` plain runs, then one with every kernel call timed."""
        self.rounds.append(_latencies(self.main, self.arguments, PLAIN_BURST))
        for key, times in _instrumented_times(self.instrumented, self.arguments, self.calls_of, 1).items():
            self.samples.setdefault(key, []).extend(times)

    def result(self, cost: HookCost) -> Measurement:
        """The medians, each call's less the hook's share."""
        calls = []
        for (function, counted), times in self.samples.items():
            invocation, index = divmod(counted, len(self.calls_of[function]))
            call = self.calls_of[function][index]
            region = self.running.get(function, [function])[invocation]  # main runs no region
            calls.append(TimedCall(region, index, call.kernel, max(statistics.median(times) - cost.seconds(call.arguments), 0.0)))
        by_place = {(c.region, c.index): c for c in calls}
        ops = {op.name: tuple(by_place[(op.region, index)] for index in op.calls if (op.region, index) in by_place) for op in self.graph.ops if op.calls}
        totals = [seconds for burst in self.rounds for seconds in burst]
        return Measurement(statistics.median(totals), [statistics.median(burst) for burst in self.rounds], calls, ops)


def _loaded(artifact: str | Path, library: Path) -> tuple[CompiledGraph, Any, list[Any]]:
    """``artifact``'s compiled graph, its library (written to ``library`` and loaded) and inputs for its ``main``.

    Raises:
        CompiledGraphError: the artifact cannot be read.
    """
    import tvm

    from edgeq_runtime import Artifact

    graph = load_compiled_graph(artifact)
    library.write_bytes(Artifact.read(artifact).members["model.so"])
    return graph, tvm.runtime.load_module(str(library)), [tvm.runtime.tensor(a) for a in _inputs(graph)]


PROBE_SECONDS = 0.15
"""How long :func:`probe_latency` runs a model (at least :data:`PROBE_RUNS` runs)."""

PROBE_RUNS = 10
"""The fewest runs of :func:`probe_latency` (a slow model's)."""


def probe_latency(artifact: str | Path) -> float:
    """The median time of ``artifact``'s ``main`` run back to back for :data:`PROBE_SECONDS` after a warm-up run, on
    the threads of a measurement (seconds): a short check of the speed this machine runs a model at now.

    Raises:
        CompiledGraphError: the artifact cannot be read.
    """
    import tvm
    from tvm import relax

    from edgeq_runtime.vm import use_threads

    use_threads(measurement_threads())
    with tempfile.TemporaryDirectory(prefix="edgeq-probe-") as folder:
        _, module, arguments = _loaded(artifact, Path(folder) / "model.so")
        main = relax.VirtualMachine(module, tvm.cpu())["main"]
        main(*arguments)
        times: list[float] = []
        while len(times) < PROBE_RUNS or sum(times) < PROBE_SECONDS:
            times.extend(_latencies(main, arguments, 1))
        return statistics.median(times)


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds all cores have spent so far (``total``), how many of them busy (neither idle nor waiting for
    I/O; on a virtual machine, time its host gave others counts as busy), and how many this process used."""

    total: float
    busy: float
    own: float


def cpu_times() -> CpuTimes:
    """The CPU times now (psutil)."""
    import psutil

    times = psutil.cpu_times()
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)  # Linux counts these in user and nice too
    own = psutil.Process().cpu_times()
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return CpuTimes(total, busy, own.user + own.system + own.children_user + own.children_system)


def others_share(before: CpuTimes, after: CpuTimes) -> float:
    """The share of all cores' time between two readings that went to other processes (0 to 1).

    Example:
        >>> others_share(CpuTimes(100.0, 30.0, 20.0), CpuTimes(102.0, 31.5, 21.0))  # of 2 core-seconds, 0.5 others'
        0.25
    """
    elapsed = after.total - before.total
    if elapsed <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return min(max(others / elapsed, 0.0), 1.0)


def _latencies(main: Any, arguments: list[Any], runs: int) -> list[float]:
    """The time of each of ``runs`` calls of ``main``, back to back (seconds)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        main(*arguments)
        times.append(time.perf_counter() - started)
    return times


def _instrumented_times(vm: Any, arguments: list[Any], calls_of: dict[str, list[KernelCall]], runs: int) -> dict[tuple[str, int], list[float]]:
    """(VM function, kernel call index over its invocations, :func:`_call_times`) -> the call's timed intervals in
    ``runs`` runs of ``vm``'s ``main``."""
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


@dataclass(frozen=True)
class HookCost:
    """What the instrument hook adds to a timed kernel call: ``fixed`` seconds, plus ``per_argument`` for each
    argument of the call (the hook receives each as a Python object)."""

    fixed: float
    per_argument: float

    def seconds(self, arguments: int) -> float:
        """The hook's share of a call with ``arguments`` arguments."""
        return self.fixed + self.per_argument * arguments


class _HookSampler:
    """Times two idle kernel calls (:func:`_idle_vm`) with the hook: the sum of two one-element tensors and the
    concatenation of eight. Sampled between a measurement's runs, their median intervals give the hook's cost at
    the speed the machine ran the measurement at."""

    def __init__(self) -> None:
        self.vms = [_idle_vm(1, inputs) for inputs in (2, 8)]
        self.argument_counts = [calls_of["main"][0].arguments for _, calls_of in self.vms]
        self.inputs = _idle_arguments()
        self.samples: list[list[float]] = [[], []]

    def sample(self, calls: int = 50) -> None:
        for (vm, calls_of), times in zip(self.vms, self.samples):
            timed = _instrumented_times(vm, self.inputs, calls_of, calls)
            times.extend(seconds for call in timed.values() for seconds in call)

    def cost(self) -> HookCost:
        few, many = (statistics.median(times) for times in self.samples)
        few_arguments, many_arguments = self.argument_counts
        per_argument = max((many - few) / (many_arguments - few_arguments), 0.0)
        return HookCost(max(few - few_arguments * per_argument, 0.0), per_argument)


def hook_cost(rounds: int = 10) -> HookCost:
    """The hook's cost on this machine now (:class:`_HookSampler`, ``rounds`` rounds)."""
    sampler = _HookSampler()
    for _ in range(rounds):
        sampler.sample()
    return sampler.cost()


def vm_invocation(calls: int = 16, rounds: int = 10, runs: int = 100) -> float:
    """The Relax VM's cost of one call of ``main`` besides its kernel calls (inputs in, result out; seconds): the
    median latency of ``main`` making one idle kernel call (:func:`_idle_vm`), less one call's worth (the
    difference to ``main`` making ``calls + 1``, over ``calls``), timed in ``rounds`` alternating rounds of
    ``runs`` runs."""
    mains = [_idle_vm(count, 2)[0]["main"] for count in (1, calls + 1)]
    arguments = _idle_arguments()
    samples: list[list[float]] = [[], []]
    for _ in range(rounds):
        for main, times in zip(mains, samples):
            main(*arguments)
            times.extend(_latencies(main, arguments, runs))
    one, more = (statistics.median(times) for times in samples)
    return max(one - max((more - one) / calls, 0.0), 0.0)


def _idle_vm(calls: int, inputs: int) -> tuple[Any, dict[str, list[KernelCall]]]:
    """A new VM (and its kernel calls) whose ``main(x)`` makes ``calls`` chained kernel calls that do next to
    nothing, each reading ``inputs`` one-element int32 tensors: a sum of two, or a concatenation."""
    import tvm
    from tvm import relax

    executable = _idle_executable(calls, inputs)
    return relax.VirtualMachine(executable, tvm.cpu()), kernel_calls(executable.as_text())


@functools.cache
def _idle_executable(calls: int, inputs: int) -> Any:
    """The executable of :func:`_idle_vm`, built once."""
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder()
    value = relax.Var("x", relax.TensorType([1], "int32"))
    with builder.function("main", [value]):
        with builder.dataflow():
            result = value
            for _ in range(calls):
                read = [result, *[value] * (inputs - 1)]
                result = builder.emit(relax.op.add(*read) if inputs == 2 else relax.op.concat(read))
            output = builder.emit_output(result)
        builder.emit_func_output(output)
    return tvm.compile(relax.transform.LegalizeOps()(builder.get()), target=tvm.target.Target({"kind": "llvm"}))


def _idle_arguments() -> list[Any]:
    import tvm

    return [tvm.runtime.tensor(np.zeros(1, np.int32))]


def _call_times(events: list[tuple[str, bool, float]], calls_of: dict[str, list[KernelCall]]) -> dict[tuple[str, int], float]:
    """(VM function, kernel call index counted over all its invocations in the run) -> seconds, from the
    instrument's before/after events of one run."""
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
