"""edgeq against the int8 CPU engines a user would pick, each at its best, in its own environment and process
(issue 34; the method in docs/measurements.md):

- edgeq: its artifact (-O2, default schedules; with ``--tune MINUTES`` also tuned that long per model), quantized
  for npu-m and compiled for this CPU, as benchmarks/latency.py does;
- ONNX Runtime int8 on its own ``quantize_static`` file (uint8 activations with zero points), in edgeq's environment;
- ExecuTorch + XNNPACK int8 (PT2E ``XNNPACKQuantizer``, one XNNPACK delegate), in ``benchmarks/peers/.venv-executorch``;
- LiteRT int8 (litert-torch PT2E, ``invoke()`` only), in ``benchmarks/peers/.venv-litert``.

``bash benchmarks/peers/setup.sh`` makes the two environments first. Every engine gets the same random-init
torchvision models (10 classes, BatchNorm statistics set on random data, seeded: the float weights are saved once
and loaded by every process), the same calibration batches and input: batch 1, 3x224x224, 2 threads, idle threads
not spinning. The engines take turns over ``--rounds`` rounds (the order rotating); each run is a new process of
the engine's runner (benchmarks/peers/run_*.py) doing ``--warmup`` then at least ``--runs`` runs back to back (1 s
at least), started only when the CPU is idle, and repeated (up to ``--attempts`` times) when other processes kept
more than ``--idle`` cores busy meanwhile. Prints per model and engine the median of the round medians, edgeq's
ratio to each peer and to the best one, each engine's share of this CPU's int8 peak (benchmarks/peak_int8.py), and
a markdown table.

    .venv/bin/python benchmarks/peers.py [--models resnet18,mobilenet_v2,mobilenet_v3_small]
        [--engines edgeq,onnxruntime,executorch,litert] [--rounds 5] [--runs 30] [--warmup 10] [--tune MINUTES]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNNERS = HERE / "peers"
sys.path[:0] = [str(REPO / "tests"), str(RUNNERS), str(HERE)]

from cpu_load import wait_until_idle  # noqa: E402
from models import random_batches, torchvision_model  # noqa: E402
from peak_int8 import Peak, measure_peak  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")
THREADS = 2
CALIBRATION_BATCHES = 4
EDGEQ = "edgeq"
EDGEQ_TUNED = "edgeq tuned"
T = TypeVar("T")


@dataclass(frozen=True)
class Engine:
    """One engine of the benchmark: the runner script it runs in which Python environment.

    Attributes:
        name: its name in the tables.
        script: its runner in benchmarks/peers/.
        venv: its environment's folder under benchmarks/peers/ (made by setup.sh), or None for edgeq's own.
        prepare_args: extra arguments of its runner's ``prepare``.
    """

    name: str
    script: str
    venv: str | None = None
    prepare_args: tuple[str, ...] = ()

    @property
    def python(self) -> Path:
        """The Python that runs it."""
        return Path(sys.executable) if self.venv is None else RUNNERS / self.venv / "bin" / "python"

    @property
    def is_edgeq(self) -> bool:
        """One of edgeq's own configurations (the others are the peers)."""
        return self.script == "run_edgeq.py"

    def environment(self) -> dict[str, str]:
        """The process environment of its runner: edgeq's checkout on the path for edgeq's environment only, idle
        OpenMP threads sleeping, ``THREADS`` threads."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env |= {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(THREADS)}
        if self.venv is None:
            env["PYTHONPATH"] = os.pathsep.join((str(REPO), str(REPO / "runtime" / "python")))
        return env


PEERS = {
    "onnxruntime": Engine("ONNX Runtime", "run_onnxruntime.py"),
    "executorch": Engine("ExecuTorch XNNPACK", "run_executorch.py", ".venv-executorch"),
    "litert": Engine("LiteRT", "run_litert.py", ".venv-litert"),
}
"""The peers by their ``--engines`` name."""


@dataclass
class Measurement:
    """One engine's runs on one model: the median of each round's runs, and the runs that other load disturbed."""

    round_medians: list[float] = field(default_factory=list)
    repeated: int = 0
    disturbed: int = 0

    @property
    def median_ms(self) -> float:
        """The median of the round medians."""
        return statistics.median(self.round_medians)


def progress(line: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def multiply_accumulates(model: nn.Module, x: torch.Tensor) -> int:
    """The multiply-accumulates of one inference of ``model`` on ``x``: every convolution's and linear layer's."""
    total = 0

    def count(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            total += output.numel() * kernel
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def write_model(name: str, size: int, folder: Path) -> tuple[Path, int]:
    """The files every runner reads for ``name`` (see benchmarks/peers/runner.py): the float weights, calibration
    batches and the input. Returns the input's path and the model's multiply-accumulates."""
    model = torchvision_model(name).model  # seeded random init, BatchNorm statistics set
    shape = (1, 3, size, size)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    np.save(folder / f"{name}-calibration.npy", np.stack(random_batches(shape, CALIBRATION_BATCHES)))
    x = random_batches(shape, 1, seed=1)[0]
    np.save(folder / f"{name}-input.npy", x)
    return folder / f"{name}-input.npy", multiply_accumulates(model, torch.from_numpy(x))


def prepare(engine: Engine, name: str, folder: Path) -> Path:
    """The engine's file for ``name``, written by its runner; its output shown on error."""
    command = [str(engine.python), str(RUNNERS / engine.script), "prepare", "--folder", str(folder), "--model", name, *engine.prepare_args]
    done = subprocess.run(command, capture_output=True, text=True, env=engine.environment(), check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine.name} could not prepare {name}:\n{done.stderr[-3000:]}")
    notes = [line for line in done.stderr.splitlines() if "delegate" in line]
    for note in notes:
        progress(f"{engine.name}: {note}")
    return Path(done.stdout.strip().splitlines()[-1])


def run_once(engine: Engine, path: Path, x_path: Path, args: argparse.Namespace) -> dict[str, object]:
    """One process of the engine's runner timing ``args.runs`` runs: its JSON result."""
    command = [str(engine.python), str(RUNNERS / engine.script), "run", "--file", str(path), "--input", str(x_path),
               "--warmup", str(args.warmup), "--runs", str(args.runs), "--threads", str(THREADS)]
    done = subprocess.run(command, capture_output=True, text=True, env=engine.environment(), check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine.name} failed on {path.name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(engine: Engine, path: Path, x_path: Path, args: argparse.Namespace, into: Measurement) -> None:
    """One round of the engine: a run started on an idle CPU, repeated while other load disturbed it (up to
    ``args.attempts`` runs; the last one counts then, and is counted as disturbed)."""
    for attempt in range(1, args.attempts + 1):
        idle, load = wait_until_idle(args.idle, timeout_s=args.idle_timeout)
        if not idle:
            progress(f"{engine.name}: the CPU did not go idle in {args.idle_timeout:.0f} s ({load:.2f} cores busy); running anyway")
        result = run_once(engine, path, x_path, args)
        other = float(result["other_cores"])
        if other <= args.idle or attempt == args.attempts:
            into.round_medians.append(statistics.median(result["times_ms"]))
            into.disturbed += other > args.idle
            return
        into.repeated += 1
        progress(f"{engine.name}: {other:.2f} cores of other load during the run; repeating")


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` starting at position ``turn`` (modulo their number), wrapping around."""
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def ratio_lines(medians: dict[str, float], edgeq_names: Sequence[str]) -> list[str]:
    """edgeq's ratios (time / time): to each peer and to the best (fastest) peer, for each of edgeq's engines."""
    peers = {name: ms for name, ms in medians.items() if name not in edgeq_names}
    if not peers:
        return []
    best = min(peers, key=peers.__getitem__)
    lines = []
    for name in edgeq_names:
        each = ", ".join(f"{medians[name] / ms:.2f}x of {peer}" for peer, ms in peers.items())
        lines.append(f"{name}: {medians[name] / peers[best]:.2f}x of the best peer ({best}); {each}")
    return lines


def engines(args: argparse.Namespace) -> list[Engine]:
    """The engines ``--engines`` and ``--tune`` ask for; an error naming setup.sh if a peer's environment is
    missing."""
    chosen = []
    for key in args.engines:
        if key == "edgeq":
            chosen.append(Engine(EDGEQ, "run_edgeq.py"))
            if args.tune:
                chosen.append(Engine(EDGEQ_TUNED, "run_edgeq.py", prepare_args=("--tune", str(args.tune))))
            continue
        peer = PEERS[key]
        if not peer.python.is_file():
            raise SystemExit(f"{peer.python}: missing; make the peers' environments first: bash benchmarks/peers/setup.sh")
        chosen.append(peer)
    return chosen


def engine_names(value: str) -> list[str]:
    """``--engines``: comma-separated, from edgeq and :data:`PEERS`."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ("edgeq", *PEERS)] or ([] if names else [value])
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {', '.join(map(repr, unknown))}; choose from edgeq, {', '.join(PEERS)}")
    return names


def model_names(value: str) -> list[str]:
    """``--models``: comma-separated torchvision classifiers."""
    import torchvision.models

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in torchvision.models.list_models(module=torchvision.models)] or ([] if names else [value])
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown torchvision classifier(s) {', '.join(map(repr, unknown))}")
    return names


def print_model(name: str, macs: int, results: dict[str, Measurement], peak: Peak | None, args: argparse.Namespace) -> None:
    """One model's engines: median of round medians, throughput and share of the peak; then edgeq's ratios."""
    print(f"\n{name} ({macs / 1e9:.3f} GMAC): median of {args.rounds} round medians, {args.runs} runs each after {args.warmup} warm-up")
    for engine, measured in results.items():
        gmacs = macs / measured.median_ms / 1e6
        share = f", {gmacs / peak.gmacs[THREADS]:.0%} of peak" if peak else ""
        notes = f"  ({measured.repeated} repeated, {measured.disturbed} disturbed)" if measured.repeated or measured.disturbed else ""
        print(f"  {engine:<20}{measured.median_ms:8.2f} ms  {gmacs:6.1f} GMAC/s{share}{notes}")
    medians = {engine: m.median_ms for engine, m in results.items()}
    for line in ratio_lines(medians, [e for e in (EDGEQ, EDGEQ_TUNED) if e in medians]):
        print(f"  {line}")


def print_markdown(all_results: dict[str, dict[str, Measurement]], macs: dict[str, int], peak: Peak | None) -> None:
    """All models as one markdown table: ms (and share of peak) per engine, then edgeq's ratio to the best peer."""
    names = list(next(iter(all_results.values())))
    edgeq_names = [e for e in (EDGEQ, EDGEQ_TUNED) if e in names]
    peers = [e for e in names if e not in edgeq_names]
    print("\n| model | " + " | ".join(names) + "".join(f" | {e} / best peer" for e in edgeq_names if peers) + " |")
    print("|---|" + "---|" * (len(names) + (len(edgeq_names) if peers else 0)))
    for model, results in all_results.items():
        cells = []
        for engine in names:
            ms = results[engine].median_ms
            share = f" ({macs[model] / ms / 1e6 / peak.gmacs[THREADS]:.0%})" if peak else ""
            cells.append(f"{ms:.2f} ms{share}")
        if peers:
            best = min(peers, key=lambda e: results[e].median_ms)
            cells += [f"{results[e].median_ms / results[best].median_ms:.2f}x ({best})" for e in edgeq_names]
        print(f"| {model} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=model_names, default=list(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    parser.add_argument("--engines", type=engine_names, default=["edgeq", *PEERS], help=f"comma-separated (default: edgeq,{','.join(PEERS)})")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--rounds", type=int, default=5, help="turns of every engine (default 5)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per round (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before them (default 10)")
    parser.add_argument("--idle", type=float, default=0.1, help="cores of other load that still count as idle (default 0.1)")
    parser.add_argument("--attempts", type=int, default=5, help="runs per round at most while other load disturbs them (default 5)")
    parser.add_argument("--idle-timeout", type=float, default=120, help="seconds to wait for an idle CPU before a run (default 120)")
    parser.add_argument("--tune", type=float, metavar="MINUTES", help="also measure edgeq tuned this long per model")
    parser.add_argument("--no-peak", action="store_true", help="skip the int8 peak microbenchmark")
    parser.add_argument("--keep", type=Path, help="write the models' files here (kept) instead of a temporary folder")
    args = parser.parse_args()
    chosen = engines(args)
    peak = None
    if not args.no_peak:
        wait_until_idle(args.idle, timeout_s=args.idle_timeout)
        peak = measure_peak((1, THREADS))
        print(peak.summary())
    print(f"{THREADS} threads each, batch 1, 3x{args.size}x{args.size}; engines: {', '.join(e.name for e in chosen)}")
    all_results, macs = {}, {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            x_path, macs[name] = write_model(name, args.size, folder)
            files = {}
            for engine in chosen:
                progress(f"{name}: preparing {engine.name}")
                files[engine.name] = prepare(engine, name, folder)
            results = {engine.name: Measurement() for engine in chosen}
            for turn in range(args.rounds):
                for engine in rotated(chosen, turn):
                    progress(f"{name}: round {turn + 1}/{args.rounds}, {engine.name}")
                    measure(engine, files[engine.name], x_path, args, results[engine.name])
            print_model(name, macs[name], results, peak, args)
            all_results[name] = results
    print_markdown(all_results, macs, peak)


if __name__ == "__main__":
    main()
