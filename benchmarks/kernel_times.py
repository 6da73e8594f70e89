"""Where an artifact's time goes on this machine, kernel by kernel (issue 34): the Relax VM's instrument hook times
every call of a run (edgeq's kernels, the VM's own builtins such as tensor allocations, and each region's function
for the VM's time between its calls), the medians over
``--runs`` runs are listed by time with the ops each kernel computes (the artifact's graph.json: kind, channels,
stride, output size), their multiply-accumulates per second, and the time by op kind.

The hook costs a Python call before and after every call (about a microsecond each, most of a region's own time):
shares and ratios between kernels are what it measures, not a latency (benchmarks/latency.py and peers.py time
whole runs).

    .venv/bin/python benchmarks/kernel_times.py model.edgeq [--threads 1] [--runs 7] [--top 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def op_description(op: Mapping, tensors: Mapping) -> str:
    """``dw 96->96 s2 @28`` for a depthwise conv2d of 96 channels, stride 2, 28 output rows; ``1x1 ...``, ``3x3 ...``
    for other conv2d; the op kind for every other op."""
    if op["op"] != "conv2d":
        return op["op"]
    attributes = op["attributes"]
    kernel = attributes["kernel"]
    kind = "dw" if attributes["groups"] > 1 and attributes["groups"] == attributes["in_channels"] else f"{kernel[0]}x{kernel[1]}"
    rows = tensors[op["outputs"][0]]["shape"][2]
    return f"{kind} {attributes['in_channels']}->{attributes['out_channels']} s{attributes['stride'][0]} @{rows}"


@dataclass(frozen=True)
class KernelTime:
    """One kernel's median time per run (microseconds), what it computes and its multiply-accumulates per run."""

    kernel: str
    microseconds: float
    ops: tuple[str, ...]
    macs: int

    @property
    def gmacs(self) -> float:
        """Multiply-accumulates per second, in billions (0 without any)."""
        return self.macs / self.microseconds / 1000 if self.macs and self.microseconds else 0.0


def kernel_times(runs: Sequence[Mapping[str, float]], graph: Mapping) -> list[KernelTime]:
    """Each kernel's median over ``runs`` (each: kernel -> microseconds in that run; a kernel missing from a run took
    0 there), with the ops of ``graph`` (graph.json) it computes, slowest first."""
    ops: dict[str, list[str]] = defaultdict(list)
    macs: Counter[str] = Counter()
    for op in graph["ops"]:
        if op.get("kernel"):
            ops[op["kernel"]].append(op_description(op, graph["tensors"]))
            macs[op["kernel"]] += op.get("macs", 0)
    names = {name for run in runs for name in run}
    medians = {name: statistics.median(run.get(name, 0.0) for run in runs) for name in names}
    found = [KernelTime(name, time, tuple(ops.get(name, ())), macs[name]) for name, time in medians.items()]
    return sorted(found, key=lambda k: (-k.microseconds, k.kernel))


def by_kind(times: Sequence[KernelTime]) -> dict[str, float]:
    """Microseconds by the kind of each kernel's first op (``dw``, ``1x1``, ``3x3``, ``add``...; ``vm`` for calls
    computing no op of the graph: the VM's builtins), largest first."""
    kinds: Counter[str] = Counter()
    for kernel in times:
        kinds[kernel.ops[0].split(" ")[0] if kernel.ops else "vm"] += kernel.microseconds
    return dict(kinds.most_common())


def timed_runs(path: Path, threads: int, runs: int) -> tuple[list[dict[str, float]], dict]:
    """Microseconds per called function in each of ``runs`` runs of the artifact at ``path`` (random inputs, after 3
    untimed runs) on ``threads`` threads, and its graph.json."""
    import tvm

    from edgeq_runtime import Model
    from edgeq_runtime.vm import use_threads

    model = Model.load(path, num_threads=threads)
    with zipfile.ZipFile(path) as archive:
        graph = json.loads(archive.read("graph.json"))
        library = path.with_suffix(".kernel_times.so")
        library.write_bytes(archive.read(model.manifest["library"]["member"]))
    try:
        vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    finally:
        library.unlink()
    rng = np.random.default_rng(0)
    arguments = [
        tvm.runtime.tensor(info.quantize(rng.normal(size=info.shape).astype(np.float32)) if info.quantized else np.zeros(info.shape, info.dtype))
        for info in model.inputs
    ]
    current: Counter[str] = Counter()
    open_calls: list[list[float]] = []  # per call in progress: its start and the time of the calls inside it (ns)

    def instrument(_function, symbol, before, _result, *_arguments) -> int:
        now = time.perf_counter_ns()
        if before:
            open_calls.append([now, 0])
            return 0
        start, inside = open_calls.pop()
        current[str(symbol)] += (now - start - inside) / 1000  # its own time (a region's: the VM between its calls)
        if open_calls:
            open_calls[-1][1] += now - start
        return 0

    use_threads(threads)
    vm.set_instrument(instrument)
    measured = []
    for run in range(3 + runs):
        current.clear()
        vm["main"](*arguments)
        if run >= 3:
            measured.append(dict(current))
    return measured, graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    runs, graph = timed_runs(args.artifact, args.threads, args.runs)
    times = kernel_times(runs, graph)
    total = sum(k.microseconds for k in times)
    print(f"{args.artifact}: {total / 1000:.3f} ms per run in its calls ({args.threads} thread(s), median of {args.runs} runs)")
    for kernel in times[: args.top]:
        share = 100 * kernel.microseconds / total
        print(f"{kernel.microseconds:9.1f} us {share:5.1f} %  {kernel.gmacs:6.1f} GMAC/s  {' + '.join(kernel.ops) or kernel.kernel}")
    print("by kind (us): " + ", ".join(f"{kind} {us:.0f}" for kind, us in by_kind(times).items()))


if __name__ == "__main__":
    main()
