"""ExecuTorch + XNNPACK int8: the float model quantized through PT2E by ``XNNPACKQuantizer`` (symmetric int8,
per-channel weights), lowered whole to one XNNPACK delegate, run by ``executorch.runtime``; in
``.venv-executorch`` (setup.sh): a runner of benchmarks/peers.py (see runner.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from runner import calibration_batches, float_model, main


def prepare(folder: Path, name: str) -> Path:
    """The ``.pte`` program: export, PT2E prepare / calibrate / convert, lower to XNNPACK (the number of delegates
    goes to stderr: one, if the partitioner took the whole model)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batches = calibration_batches(folder, name)
    example = (batches[0],)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(float_model(folder, name), example).module(), quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    quantized = torch.export.export(convert_pt2e(prepared), example)
    lowered = to_edge_transform_and_lower(quantized, partitioner=[XnnpackPartitioner()])
    graph = lowered.exported_program().graph_module.graph
    delegates = sum(1 for node in graph.nodes if node.op == "call_function" and "call_delegate" in str(node.target))
    print(f"{name}: {delegates} XNNPACK delegate(s)", file=sys.stderr)
    path = folder / f"{name}-executorch.pte"
    path.write_bytes(lowered.to_executorch().buffer)
    return path


def load(path: Path, threads: int, x: np.ndarray) -> Callable[[], object]:
    """The program's ``forward`` method, XNNPACK's thread pool reset to ``threads`` threads."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(path).load_method("forward")
    inputs = [torch.from_numpy(x)]
    return lambda: method.execute(inputs)


if __name__ == "__main__":
    main(prepare, load)
