"""LiteRT int8: the float model quantized through PT2E by litert-torch's ``PT2EQuantizer`` (symmetric int8,
per-channel weights) and converted to a ``.tflite`` file, run by ``ai_edge_litert``'s interpreter (its default
XNNPACK delegate); in ``.venv-litert`` (setup.sh): a runner of benchmarks/peers.py (see runner.py).

Only ``invoke()`` is timed: the file has int8 input and output, quantized once before the runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from runner import calibration_batches, float_model, main


def prepare(folder: Path, name: str) -> Path:
    """The ``.tflite`` file: export, PT2E prepare / calibrate / convert, litert-torch's conversion."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batches = calibration_batches(folder, name)
    example = (batches[0],)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    prepared = prepare_pt2e(torch.export.export(float_model(folder, name), example).module(), quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    converted = litert_torch.convert(convert_pt2e(prepared, fold_quantize=False), example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    path = folder / f"{name}-litert.tflite"
    converted.export(str(path))
    return path


def load(path: Path, threads: int, x: np.ndarray) -> Callable[[], object]:
    """An interpreter on ``threads`` threads, its input set to ``x`` (quantized if the file takes integers)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero_point = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
    interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))
    return interpreter.invoke


if __name__ == "__main__":
    main(prepare, load)
