"""TorchScript export of the integer model: what the seed flow saves as ``int_model.pt``.

:func:`trace` runs ``torch.jit.trace`` on the integer model behind two additions:

- input checks, scripted so that they run on every call: inputs must be float tensors with the example's
  shape (any batch size). The trace recorded one path, and the integer model folds sizes into its multipliers
  (a global average pool's 1/(H*W)), so another input size would give wrong numbers instead of an error;
- edgeq's own description of the same model, its QDQ ONNX bytes, as the buffer ``edgeq_qdq_onnx``.
  ``torch.jit.save`` keeps it, and the compiler reads a TorchScript file through it, so the ``.pt`` and the
  ``.onnx`` file of one integer model compile to the same program.

What tracing cannot capture is data-dependent control flow; torch.fx already refused it when the model was
prepared, so the integer model has none. TorchScript is deprecated upstream (torch prints FutureWarnings);
edgeq supports it because the seed flow uses it, and QDQ ONNX is the primary format.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import List

import torch
from torch import nn

from edgeq.errors import ExportError
from edgeq.export.onnx_writer import build_onnx
from edgeq.fileio import atomic_write
from edgeq.quantization.integer_model import IntegerModel

DESCRIPTION_BUFFER = "edgeq_qdq_onnx"
"""Name of the uint8 buffer holding the QDQ ONNX description inside an edgeq TorchScript module."""


def _checked_input(value: torch.Tensor, index: int, shape: List[int]) -> torch.Tensor:
    """Input checks; scripted by :func:`_scripted_check` so that they run on every call of the traced module."""
    if not value.is_floating_point():
        raise RuntimeError(
            "edgeq: input " + str(index) + " must be a float tensor: the module was traced with float inputs and "
            "quantizes them itself"
        )
    if value.dim() != len(shape) or value.shape[1:] != shape[1:]:
        raise RuntimeError(
            "edgeq: input " + str(index) + " has shape " + str(value.shape) + " but the integer model was converted "
            "for " + str(shape) + " (any batch size)"
        )
    return value


@functools.cache
def _scripted_check() -> torch.jit.ScriptFunction:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; the seed flow uses it
        return torch.jit.script(_checked_input)


class _Guarded(nn.Module):
    """The integer model behind input checks, carrying its QDQ description as a buffer."""

    def __init__(self, int_model: IntegerModel, shapes: list[list[int]], description: bytes) -> None:
        super().__init__()
        self.model = int_model
        self.shapes = shapes
        self.register_buffer(DESCRIPTION_BUFFER, torch.frombuffer(bytearray(description), dtype=torch.uint8))

    def forward(self, *inputs: torch.Tensor) -> object:
        check = _scripted_check()
        return self.model(*[check(x, i, shape) for i, (x, shape) in enumerate(zip(inputs, self.shapes))])


def trace(int_model: IntegerModel, example_inputs: Sequence[torch.Tensor]) -> torch.jit.ScriptModule:
    """TorchScript of the integer model: same outputs as ``int_model`` (exactly), float inputs, guarded shapes.

    Raises:
        ExportError: ``int_model`` is not an :class:`IntegerModel` or the example inputs are not float tensors.
    """
    if not isinstance(int_model, IntegerModel):
        raise ExportError(f"trace: expected the integer model from convert_fx; got {type(int_model).__name__}")
    example_inputs = tuple(example_inputs)
    description = build_onnx(int_model, example_inputs).SerializeToString()
    guarded = _Guarded(int_model.eval(), [list(x.shape) for x in example_inputs], description)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(guarded, example_inputs, check_trace=False)


def save_torchscript(int_model: IntegerModel, example_inputs: Sequence[torch.Tensor], path: str | Path) -> Path:
    """Trace and save atomically (a failure leaves no file)."""
    module = trace(int_model, example_inputs)
    with atomic_write(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, str(temporary))
    return Path(path)
