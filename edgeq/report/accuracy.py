"""Per-layer accuracy: how far each layer's integer output is from the float model's, on sample inputs.

The float model is prepared for the integer model's target and run in the CALIBRATION state, which computes in
float (nothing is fake-quantized) with the same op granularity as the integer model: each canonical op (a conv
with its BatchNorm and activation, an add, a pool...) sits at the same module path in both graphs. Every
integer op's output is dequantized (``float32(q) * scale``) and compared with the float output of the op at its
path, as Horizon's and Rockchip's accuracy tools do:

- cosine similarity ``<f, r> / (|f| |r|)`` (1 for two all-zero tensors);
- SQNR ``10 log10(sum f^2 / sum (f - r)^2)`` in dB (infinite when they are equal);
- the largest absolute difference.

A layer with cosine below :data:`COSINE_FLOOR` is flagged. The error accumulates along the graph: the first
flagged layer is the one to look at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgeq.compile.compiled_graph import CompiledGraph
from edgeq.errors import QuantizationError
from edgeq.quantization import FakeQuantState, default_calib_qconfig, prepare_qat_fx, set_fake_quantize
from edgeq.quantization.graph import record_values
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.integer_ops import IntDequantize

COSINE_FLOOR = 0.99
"""Layers whose cosine similarity is below this are flagged."""


@dataclass(frozen=True)
class LayerAccuracy:
    """One integer op's output against the float model's.

    Attributes:
        layer: the module path (``layer1.0.conv1``), the same in the float and the integer model.
        op: the compiled graph's op that makes this output (None when no graph was given or the op has none).
        cosine: cosine similarity.
        sqnr_db: signal to quantization noise ratio in dB (``inf`` when equal).
        max_abs_error: the largest absolute difference.
        flagged: cosine below :data:`COSINE_FLOOR`.
    """

    layer: str
    op: str | None
    cosine: float
    sqnr_db: float
    max_abs_error: float
    flagged: bool

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (an infinite SQNR is ``None``)."""
        return {
            "layer": self.layer,
            "op": self.op,
            "cosine": self.cosine,
            "sqnr_db": self.sqnr_db if math.isfinite(self.sqnr_db) else None,
            "max_abs_error": self.max_abs_error,
            "flagged": self.flagged,
        }


def compare(reference: torch.Tensor, value: torch.Tensor) -> tuple[float, float, float]:
    """(cosine, SQNR in dB, max absolute error) of ``value`` against ``reference``.

    Example:
        >>> compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
        (1.0, inf, 0.0)
        >>> [round(v, 4) for v in compare(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0]))]
        [0.96, 10.9691, 1.0]
    """
    f, r = reference.double().flatten(), value.double().flatten()
    if torch.equal(f, r):
        return 1.0, math.inf, 0.0
    norms = f.norm() * r.norm()
    cosine = float(f @ r / norms) if norms > 0 else 0.0
    signal, noise = float((f**2).sum()), float(((f - r) ** 2).sum())
    sqnr = 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    return cosine, sqnr, float((f - r).abs().max())


def layer_accuracy(
    float_model: nn.Module,
    int_model: IntegerModel,
    sample_inputs: Sequence[torch.Tensor],
    graph: CompiledGraph | None = None,
) -> list[LayerAccuracy]:
    """Every integer op's output against the float model's, in the integer graph's order.

    Args:
        float_model: the float model the integer model was made from (its float weights).
        int_model: the integer model.
        sample_inputs: the model's inputs (a batch; statistics are over the whole batch).
        graph: the compiled graph, to name each layer's op.

    Raises:
        QuantizationError: a layer of the integer model is missing from the float model or has another shape
            (named); errors of prepare (no QuantStub, untraceable model).
    """
    inputs = tuple(sample_inputs)
    prepared = prepare_qat_fx(float_model, default_calib_qconfig, example_inputs=inputs, target=int_model.target).eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    float_values = {str(n.target): v for n, v in record_values(prepared, *inputs).items() if n.op == "call_module"}
    # An op at module path P is ONNX node P/<OpType>; with a separate activation the last one makes P's output.
    op_at = {op.name.rpartition("/")[0]: op.name for op in graph.ops} if graph is not None else {}
    layers = []
    for node, value in record_values(int_model.graph_module, *inputs).items():
        quant = int_model.tensor_quant.get(node.name)
        if node.op != "call_module" or quant is None:
            continue
        path = str(node.target)
        reference = float_values.get(path)
        if not isinstance(reference, torch.Tensor) or reference.shape != value.shape:
            got = "no such layer" if not isinstance(reference, torch.Tensor) else f"shape {tuple(reference.shape)}"
            raise QuantizationError(
                f"layer_accuracy: layer '{path}' of the integer model (shape {tuple(value.shape)}) does not match "
                f"{type(float_model).__name__}'s ({got}); give the float model the integer model was converted from"
            )
        cosine, sqnr, error = compare(reference, IntDequantize(quant)(value))
        layers.append(LayerAccuracy(path, op_at.get(path), cosine, sqnr, error, cosine < COSINE_FLOOR))
    return layers
