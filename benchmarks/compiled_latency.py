"""Latency of edgeq's compiled artifact (TVM, untuned) against ONNX Runtime on the same QDQ ONNX file.

Quantizes a random-init torchvision model for a target, exports it, compiles it at each optimisation level for
this machine, and times single-image inference interleaved with ONNX Runtime (int8 kernels, configured for this
CPU by edgeq.export.peer and printed first; ORT documents its exact u8u8 kernels as slower). Prints the median
latencies and the ratio edgeq / ONNX Runtime.

    .venv/bin/python benchmarks/compiled_latency.py [--model resnet18] [--size 224] [--levels 1] [--runs 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from edgeq.compile import compile_model  # noqa: E402
from edgeq.export import to_onnx  # noqa: E402
from edgeq.export.peer import peer_path, session  # noqa: E402
from edgeq_runtime import Model  # noqa: E402
from models import integer_model, torchvision_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--target", default="npu-m")
    parser.add_argument("--levels", default="1", help="comma-separated optimisation levels")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import onnx

    torch.manual_seed(0)
    example = torch.randn(1, 3, args.size, args.size)
    int_model = integer_model(torchvision_model(args.model), example, args.target)
    folder = Path(tempfile.mkdtemp())
    onnx_path = to_onnx(int_model, (example,), folder / "model.onnx")
    peer = session(onnx.load(str(onnx_path)))
    x = example.numpy()
    x_q = int_model.graph_module.quant(example).numpy()
    print(f"{args.model} {args.size}x{args.size}, batch 1, target {args.target} (simulated on this CPU), {torch.get_num_threads()} threads")
    print(f"ONNX Runtime path: {peer_path().name} ({peer_path().reason})")
    for level in (int(v) for v in args.levels.split(",")):
        started = time.perf_counter()
        result = compile_model(onnx_path, out=folder / f"O{level}.edgeq", opt_level=level, simulate=True, progress=lambda _: None)
        compile_seconds = time.perf_counter() - started
        times = {"edgeq": [], "onnxruntime": []}
        with Model.load(result.artifact) as model:
            model.run(x_q, raw=True)
            peer.run(None, {"x": x})
            for _ in range(args.runs):
                started = time.perf_counter()
                model.run(x_q, raw=True)
                times["edgeq"].append(time.perf_counter() - started)
                started = time.perf_counter()
                peer.run(None, {"x": x})
                times["onnxruntime"].append(time.perf_counter() - started)
        edgeq, ort = statistics.median(times["edgeq"]), statistics.median(times["onnxruntime"])
        print(f"  -O{level}: compile {compile_seconds:.1f} s; edgeq {edgeq * 1000:.1f} ms, ONNX Runtime {ort * 1000:.2f} ms, ratio {edgeq / ort:.0f}x")


if __name__ == "__main__":
    main()
