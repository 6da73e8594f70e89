"""What the check knows about each op, whatever the model came from (PyTorch graph or QDQ ONNX file)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeq.check.work import work
from edgeq.op_attrs import OpAttrs, check_attributes
from edgeq.ops import Op, op_named

INPUT_PREFIX = "input:"
"""Prefix of the producer name of a model input (``input:x``)."""


@dataclass
class QuantFacts:
    """The quantization around one op, when the model is quantized.

    Attributes:
        input_scales: scale of each activation input (per tensor).
        output_scale: scale of the int8 output (``None`` for an int32 or float output).
        weight_scales: per-output-channel weight scales (conv and linear).
        accumulator_bounds: per output channel, the largest ``|acc|`` any input can give (conv and linear,
            :func:`edgeq.numerics.accumulator_bounds`); empty when the weights are not int8 constants.
        problems: why the op's tensors do not fit edgeq's int8 symmetric numerics, one sentence each.
        input_zero_points: zero point of each activation input, as int8 (a uint8 one less 128; docs/numerics.md
            section 9); empty for edgeq's own models, whose zero points are all 0.
        output_zero_point: the int8 output's zero point, likewise.
    """

    input_scales: tuple[float, ...] = ()
    output_scale: float | None = None
    weight_scales: tuple[float, ...] = ()
    accumulator_bounds: tuple[int, ...] = ()
    problems: list[str] = field(default_factory=list)
    input_zero_points: tuple[int, ...] = ()
    output_zero_point: int = 0

    @property
    def input_zero_point(self) -> int:
        """The first input's zero point (0 when there is none)."""
        return self.input_zero_points[0] if self.input_zero_points else 0


@dataclass
class OpRecord:
    """One op of the model as the NPU would see it (after fusion).

    Attributes:
        name: the node's name (module path, or ONNX node name).
        op: edgeq's op (an :class:`edgeq.ops.Op`, itself its name: ``conv2d``, ``add``...; a name given as a
            string becomes the member) or, for an op edgeq has no integer implementation of, its own lowercase
            name (``logsoftmax``).
        source_op: what the model says (``Conv2d+BatchNorm2d+ReLU6``, ``Conv``) for display.
        inputs: names of the records producing this op's inputs (``input:<name>`` for model inputs).
        input_shapes: shapes of the activation inputs.
        output_shape: shape of the (first) output.
        attrs: the op's settings, of the class its op registers (:mod:`edgeq.op_attrs`: :class:`Conv2dAttrs`
            for a conv2d...); ``None`` for an op without settings, one edgeq does not know, or one whose settings
            the check could not read (a convolution whose weights are not constants).
        quant: quantization, ``None`` while the model is float.
        rejected: why edgeq cannot run this op at all (it cannot quantize it, or it is float code outside the
            integer region); ``None`` otherwise.
        float_only: the op runs in float: the QDQ file leaves it unquantized, or it is a float fallback of
            ``prepare_qat_fx`` (no integer form, or qconfig ``None``).
        float_reason: why it runs in float, when known (the float fallback says so).
        onnx_op: the ONNX op type, for ops read from an ONNX file.
    """

    name: str
    op: Op | str
    source_op: str
    inputs: list[str]
    input_shapes: list[tuple[int, ...]]
    output_shape: tuple[int, ...] | None
    attrs: OpAttrs | None = None
    quant: QuantFacts | None = None
    rejected: str | None = None
    float_only: bool = False
    float_reason: str | None = None
    onnx_op: str | None = None

    def __post_init__(self) -> None:
        self.op = op_named(self.op) or self.op
        check_attributes(self.op, self.attrs)

    @property
    def itemsizes(self) -> tuple[int, int]:
        """Bytes per element of the op's inputs and of its output on the device: float32 for an op that runs in
        float, an int32 output for a conv or linear whose quantized output has no int8 scale, int8 otherwise
        (a float model is checked as the int8 model it becomes)."""
        if self.float_only:
            return 4, 4
        int32_output = self.quant is not None and self.quant.output_scale is None
        return 1, 4 if int32_output else 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates per inference (convolutions, linear layers and matmuls; 0 for other ops,
        :mod:`edgeq.check.work`)."""
        return work(self.op, self.attrs, self.input_shapes, self.output_shape).macs


def foreign_op_name(name: str) -> str:
    """The name of an op edgeq does not know, one spelling for all sources: lowercase, no underscores
    (ONNX ``LogSoftmax``, ``nn.LogSoftmax`` and ``F.log_softmax`` are all ``logsoftmax``)."""
    return name.lower().replace("_", "")
