"""QAT training step time vs the float training step, on torchvision mobilenet_v2 (random init).

Prints the median time of each and the ratio QAT / float, measured interleaved in the same run. Speed targets
live here, not in the tests.

    .venv/bin/python benchmarks/qat_step_time.py [--batch 8] [--size 224] [--steps 5] [--target npu-m]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import Wrapped  # noqa: E402

from edgeq.quantization import FakeQuantState, prepare_qat_fx, set_fake_quantize  # noqa: E402


def step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    started = time.perf_counter()
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--target", default="npu-m")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    float_model = Wrapped(torchvision.models.mobilenet_v2()).train()
    qat_model = prepare_qat_fx(float_model, example_inputs=(images[:1],), target=args.target).train()
    set_fake_quantize(qat_model, FakeQuantState.QAT)
    models = {"float": float_model, "qat": qat_model}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 1):  # the first round warms up and is not counted
        for name, model in models.items():
            seconds = step_seconds(model, optimizers[name], images, labels)
            if step:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"mobilenet_v2, batch {args.batch}x3x{args.size}x{args.size}, {args.steps} steps each, {torch.get_num_threads()} threads, target {args.target}")
    for name, median in medians.items():
        print(f"  {name:5s} training step: median {median * 1000:8.1f} ms")
    print(f"  ratio qat / float: {medians['qat'] / medians['float']:.2f}x")


if __name__ == "__main__":
    main()
