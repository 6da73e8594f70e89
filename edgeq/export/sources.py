"""Any quantized model, as the QDQ model that check and compile consume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from edgeq.errors import EdgeqError
from edgeq.export.onnx_reader import QDQModel, load_model_file, qdq_from_torchscript, read_qdq
from edgeq.export.onnx_writer import build_onnx
from edgeq.quantization.convert import convert_fx
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.prepare import is_prepared
from edgeq.quantization.qat_modules import Requantizing

ModelLike = nn.Module | torch.jit.ScriptModule | str | Path


def is_calibrated(prepared: fx.GraphModule) -> bool:
    """Whether every activation quantizer of a prepared model has a range (or a fixed scale)."""
    quantizers = [m.output_quantizer for m in prepared.modules() if isinstance(m, Requantizing) and m.output_quantizer is not None]
    return all(q.observer is None or q.observer.has_data for q in quantizers)


def quantized_form(model: ModelLike, example_inputs: Sequence[torch.Tensor] | None) -> tuple[QDQModel, str] | None:
    """The QDQ model of ``model`` and a description of what it was, or None for a model not quantized yet.

    Accepts the path of a QDQ ONNX or edgeq TorchScript file, an edgeq TorchScript module, the integer model, or
    a calibrated / trained prepared model (converted first); PyTorch models need ``example_inputs``.

    Raises:
        EdgeqError: a PyTorch model without example inputs; ModelFileError for unreadable files.
    """
    if isinstance(model, (str, Path)):
        return load_model_file(model), str(model)
    if isinstance(model, torch.jit.ScriptModule):
        return qdq_from_torchscript(model, "TorchScript module"), "TorchScript module"
    if is_prepared(model) and is_calibrated(model):
        model = convert_fx(model)
    if isinstance(model, IntegerModel):
        if example_inputs is None:
            raise EdgeqError(f"{type(model).__name__} is a PyTorch model; give example_inputs=(x,) for its shapes")
        name = type(model.graph_module).__name__
        return read_qdq(build_onnx(model, tuple(example_inputs)), name), f"integer model {name}"
    return None
