"""edgeq's compile time for the Arm Ethos-U targets: the wall time of ``compile_model`` as ``edgeq compile MODEL
--target T`` runs it (the host library built for the target's CPU; Vela on each NPU region), split into Vela's step
(each NPU region written as TOSA and compiled by Vela in a child process) and edgeq's own (import, partition,
lowering, TVM's codegen, writing the artifact), as ``CompileResult.seconds`` records them.

Each model (random init, BatchNorm statistics set on random data) is quantized for the target first (not timed),
then compiled ``--repeat`` times into a temporary folder; one line per compile. Time it on a quiet machine.

    .venv/bin/python benchmarks/ethos_u_compile_time.py [--models mobilenet_v2,resnet18]
        [--targets ethos-u55-128,ethos-u65-256] [--size 224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from models import integer_model, torchvision_model  # noqa: E402

from edgeq.compile import compile_model  # noqa: E402

VELA_STEP = "vela"
"""The step of ``CompileResult.seconds`` that writes the NPU regions as TOSA and runs Vela on them."""


def compile_seconds(name: str, target: str, size: int, repeat: int) -> list[tuple[float, dict[str, float]]]:
    """Quantize torchvision's ``name`` for ``target``, then compile it ``repeat`` times: each compile's wall time
    and its steps' seconds."""
    torch.manual_seed(0)
    example = torch.randn(1, 3, size, size)
    int_model = integer_model(torchvision_model(name), example, target)
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            result = compile_model(int_model, (example,), target=target, out=Path(folder) / f"{name}.edgeq")
            runs.append((time.perf_counter() - started, result.seconds))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--targets", default="ethos-u55-128,ethos-u65-256")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3, help="compiles per model and target")
    args = parser.parse_args()
    for name in args.models.split(","):
        for target in args.targets.split(","):
            for wall, seconds in compile_seconds(name, target, args.size, args.repeat):
                vela = seconds.get(VELA_STEP, 0.0)
                steps = ", ".join(f"{step} {s:.1f} s" for step, s in seconds.items() if step != VELA_STEP)
                print(f"{name:14} {target:14} {args.size}x{args.size}  compile {wall:6.1f} s  Vela {vela:5.1f} s  "
                      f"edgeq {wall - vela:6.1f} s ({steps})", flush=True)


if __name__ == "__main__":
    main()
