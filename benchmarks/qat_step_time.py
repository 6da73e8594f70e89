"""QAT training step time vs the float training step, on torchvision mobilenet_v2 (random init).

Prints the median time of each and the ratio QAT / float, measured interleaved in the same run: wall time, and
the process's CPU time (user + system, every thread), which moves less when other programs load the machine.
``--profile`` adds torch.profiler's self CPU time per op of one float and one QAT step (the least of a few
profiled rounds, so a round slowed by the load counts less) and how many ops each step calls. Speed targets live
here, not in the tests.

    .venv/bin/python benchmarks/qat_step_time.py [--batch 8] [--size 224] [--steps 10] [--target npu-m] [--profile]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import Wrapped  # noqa: E402

from edgeq.quantization import FakeQuantState, prepare_qat_fx, set_fake_quantize  # noqa: E402

PROFILE_ROUNDS = 3
PROFILE_ROWS = 20


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    step()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def op_profile(step: Callable[[], None]) -> tuple[dict[str, float], dict[str, int]]:
    """Per op: the least self CPU time (ms) over PROFILE_ROUNDS profiled steps, and its number of calls a step."""
    least: dict[str, float] = {}
    calls: dict[str, int] = {}
    for _ in range(PROFILE_ROUNDS):
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            step()
        for event in profiled.key_averages():
            least[event.key] = min(least.get(event.key, float("inf")), event.self_cpu_time_total / 1000)
            calls[event.key] = event.count
    return least, calls


def print_profiles(steps: dict[str, Callable[[], None]]) -> None:
    (float_ms, float_calls), (qat_ms, qat_calls) = op_profile(steps["float"]), op_profile(steps["qat"])
    print(f"  op calls a step: float {sum(float_calls.values())}, qat {sum(qat_calls.values())}")
    print(f"  self CPU time, sum of each op's least: float {sum(float_ms.values()):.1f} ms, qat {sum(qat_ms.values()):.1f} ms")
    print(f"  {'op (most QAT time over float first)':60s} {'float calls':>11s} {'ms':>8s} {'qat calls':>9s} {'ms':>8s}")
    ops = sorted(set(float_ms) | set(qat_ms), key=lambda op: float_ms.get(op, 0.0) - qat_ms.get(op, 0.0))
    for op in ops[:PROFILE_ROWS]:
        print(f"  {op[:60]:60s} {float_calls.get(op, 0):11d} {float_ms.get(op, 0.0):8.1f} {qat_calls.get(op, 0):9d} {qat_ms.get(op, 0.0):8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--target", default="npu-m")
    parser.add_argument("--profile", action="store_true", help="also print the self CPU time per op of each step")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    float_model = Wrapped(torchvision.models.mobilenet_v2()).train()
    qat_model = prepare_qat_fx(float_model, example_inputs=(images[:1],), target=args.target).train()
    set_fake_quantize(qat_model, FakeQuantState.QAT)
    models = {"float": float_model, "qat": qat_model}
    steps = {name: training_step(m, torch.optim.SGD(m.parameters(), lr=1e-4), images, labels) for name, m in models.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for round_ in range(args.steps + 1):  # the first round warms up and is not counted
        for name, step in steps.items():
            seconds = timed(step)
            if round_:
                times[name].append(seconds)
    wall = {name: statistics.median(w for w, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    print(f"mobilenet_v2, batch {args.batch}x3x{args.size}x{args.size}, {args.steps} steps each, {torch.get_num_threads()} threads, target {args.target}")
    for name in models:
        print(f"  {name:5s} training step: median {wall[name] * 1000:8.1f} ms, CPU time {cpu[name] * 1000:8.1f} ms")
    print(f"  ratio qat / float: {wall['qat'] / wall['float']:.2f}x (CPU time {cpu['qat'] / cpu['float']:.2f}x)")
    if args.profile:
        print_profiles(steps)


if __name__ == "__main__":
    main()
