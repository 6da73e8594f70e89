"""The integer model as a standard QDQ ONNX file, written node by node with the onnx helper API.

Every integer tensor appears as ``QuantizeLinear`` (float -> int8, scalar scale, zero point 0) followed by
``DequantizeLinear`` where it is consumed; each op runs between a DequantizeLinear and a QuantizeLinear, as
ONNX Runtime's ``quantize_static`` writes it and as TensorRT, OpenVINO and TVM read it. Weights are int8
initializers with a per-channel DequantizeLinear (axis 0), biases int32 initializers with a per-channel
DequantizeLinear at scale ``s_in * s_w[c]``; BatchNorm is already folded. An int32 output (the high-precision
mode) is the float output of its Conv/Gemm, not quantized again.

Each op's QDQ unit is a function here, registered against the op in :data:`QDQ_UNITS`; the names, Q/DQ pairs, the
float fallback's boundaries and data movement are :class:`~edgeq.export.qdq_builder.QDQBuilder`'s (see its module
for the names). Shapes are static: those of the example inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import helper

from edgeq import __version__
from edgeq.errors import ExportError
from edgeq.export.float_onnx import OPSETS
from edgeq.export.qdq_builder import (
    CONTRIB_DOMAIN,
    CONTRIB_OPS,
    FloatConstant,
    Int32Result,
    QDQBuilder,
    QTensor,
    TensorQuant,
    value_info,
)
from edgeq.fileio import atomic_write
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable
from edgeq.quantization.graph import record_values
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.integer_ops import (
    INTEGER_OPS,
    IntAdd,
    IntAvgPool2d,
    IntClamp,
    IntConcat,
    IntConv2d,
    IntDequantize,
    IntEnterFloat,
    IntGlobalAvgPool2d,
    IntLeaveFloat,
    IntLinear,
    IntLookupTable,
    IntMatMul,
    IntMaxPool2d,
    IntMul,
    IntQuantize,
    IntUpsampleBilinear2d,
    IntUpsampleNearest2d,
)
from edgeq.quantization.patterns import moves_values, source_op
from edgeq.quantization.qat_modules import CONSTANT_KEY, FLOAT_REASON_KEY

OPSET = OPSETS[0]
"""Per-axis QuantizeLinear / DequantizeLinear arrived in opset 13, the oldest opset every QDQ consumer reads
(ONNX Runtime, TensorRT 8+, OpenVINO, TVM); only an op left in float that torch writes at a newer opset alone
raises a file's (:data:`edgeq.export.float_onnx.OPSETS`)."""


HARDSIGMOID_ATTRIBUTES = {"alpha": 1 / 6, "beta": 0.5}
"""PyTorch's Hardsigmoid, ``relu6(x + 3) / 6``, as ONNX HardSigmoid ``clip(alpha * x + beta, 0, 1)``."""

TARGET_METADATA_KEY = "edgeq.target"
"""``metadata_props`` key holding the name of the target the model was quantized for."""
ROUNDING_METADATA_KEY = "edgeq.rounding"
"""``metadata_props`` key holding the rounding rule of the model's integers (:class:`~edgeq.targets.Rounding`):
QuantizeLinear rounds half to even, so a file whose rule is ``half_up`` says so here (docs/export.md)."""

QDQUnit = Callable[[QDQBuilder, fx.Node, Any, list[Any]], Any]

QDQ_UNITS: OpTable[QDQUnit] = OpTable("QDQ unit in onnx_writer.py", lambda info: not info.movement)
"""How each op's integer op becomes its QDQ unit; ops that only move values are written from their fx node
(:meth:`QDQBuilder.move`)."""

_BOUNDARIES: dict[type, QDQUnit] = {
    IntQuantize: QDQBuilder.quantize_input,
    IntDequantize: QDQBuilder.dequantize_output,
    IntEnterFloat: QDQBuilder.enter_float,
    IntLeaveFloat: QDQBuilder.quantize_input,
}
"""The region's and the float fallback's boundaries, by their integer module's class."""


def build_onnx(
    int_model: IntegerModel,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """The QDQ ``ModelProto`` of an integer model, with the static shapes of ``example_inputs``."""
    for index, tensor in enumerate(example_inputs):
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            raise ExportError(f"example input {index} must be a float tensor (QDQ ONNX files take float inputs)")
    values = record_values(int_model.graph_module, *example_inputs)
    return _build(QDQBuilder(int_model, values, input_names, output_names))


def _unit(module: torch.nn.Module) -> QDQUnit | None:
    op = INTEGER_OPS.op_of_instance(module)
    return QDQ_UNITS[op] if op is not None else _BOUNDARIES.get(type(module))


def _build(builder: QDQBuilder) -> onnx.ModelProto:
    """The ONNX model of the builder's integer graph, node by node."""
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    placeholder_names = iter(builder.input_names)
    for node in builder.graph.nodes:
        if node.op == "placeholder":
            name = next(placeholder_names)
            inputs.append(value_info(name, builder.values[node]))
            builder.env[node] = name
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            outputs.extend(value_info(builder.env[result], builder.values[result]) for result in results)
        else:
            builder.env[node] = _emit(builder, node)
    graph = helper.make_graph(
        builder.nodes, _graph_name(builder.int_model), inputs, outputs, builder.initializers, value_info=builder.value_infos
    )
    standard = helper.make_opsetid("", builder.opset)
    contrib = [helper.make_opsetid(CONTRIB_DOMAIN, 1)] if any(n.domain == CONTRIB_DOMAIN for n in builder.nodes) else []
    model = helper.make_model(
        graph, opset_imports=[standard, *contrib], producer_name="edgeq", producer_version=__version__
    )
    model.ir_version = helper.find_min_ir_version_for([standard])
    helper.set_model_props(
        model, {TARGET_METADATA_KEY: builder.int_model.target, ROUNDING_METADATA_KEY: builder.int_model.rounding.value}
    )
    return model


def _emit(builder: QDQBuilder, node: fx.Node) -> Any:
    """The ONNX value of ``node``: its QDQ unit's result, a static value, a constant, a float op's output, or its
    values moved."""
    args = list(fx.node.map_arg(node.args, builder.env.__getitem__))
    unit = _unit(builder.modules[node.target]) if node.op == "call_module" else None
    if unit is not None:
        return unit(builder, node, builder.modules[node.target], args)
    value = builder.values[node]
    if not (isinstance(value, torch.Tensor) or _holds_tensor(value)):
        return value  # shape arithmetic (x.size(), //): its value is static
    if CONSTANT_KEY in node.meta:
        return FloatConstant(node)
    if FLOAT_REASON_KEY in node.meta:
        return builder.float_op(node)
    if not _holds_qtensor(args):
        raise ExportError(
            f"'{node.name}' ({node.target}): float ops outside the QuantStub/DeQuantStub region cannot be "
            "exported; keep pre- and post-processing out of the model you export"
        )
    if not moves_values(source_op(node, builder.modules)):
        raise ExportError(f"'{node.name}': {node.target} on an integer tensor has no QDQ form")
    return builder.move(node, args)


@QDQ_UNITS.register(Op.CONV2D)
def _conv(builder: QDQBuilder, node: fx.Node, op: IntConv2d, args: list[Any]) -> Any:
    path = builder.path(node)
    weight, bias = builder.weights(path, op)
    out = builder.node(
        "Conv", [builder.dequantize(args[0]), weight, bias], builder.float_output_name(node, op), f"{path}/Conv",
        kernel_shape=list(op.weight.shape[2:]), strides=list(op.stride), dilations=list(op.dilation),
        pads=[*op.padding, *op.padding], group=op.groups,
    )
    return builder.finish(node, out, op.output, op.clamp)


@QDQ_UNITS.register(Op.LINEAR)
def _linear(builder: QDQBuilder, node: fx.Node, op: IntLinear, args: list[Any]) -> Any:
    path = builder.path(node)
    source = builder.dequantize(args[0])
    output = builder.float_output_name(node, op)
    if builder.values[node.args[0]].dim() == 2:
        weight, bias = builder.weights(path, op)
        out = builder.node("Gemm", [source, weight, bias], output, f"{path}/Gemm", transB=1)
    else:
        weight, bias = builder.weights(path, op, transposed=True)
        product = builder.node("MatMul", [source, weight], f"{path}.matmul", f"{path}/MatMul")
        out = builder.node("Add", [product, bias], output, f"{path}/Add")
    return builder.finish(node, out, op.output, op.clamp)


@QDQ_UNITS.register(Op.ADD)
def _add(builder: QDQBuilder, node: fx.Node, op: IntAdd, args: list[Any]) -> Any:
    path = builder.path(node)
    out = builder.node("Add", [builder.dequantize(args[0]), builder.dequantize(args[1])], f"{path}.out", f"{path}/Add")
    return builder.finish(node, out, TensorQuant("int8", (op.output_scale,)), op.clamp)


@QDQ_UNITS.register(Op.MUL)
def _mul(builder: QDQBuilder, node: fx.Node, op: IntMul, args: list[Any]) -> Any:
    path = builder.path(node)
    out = builder.node("Mul", [builder.dequantize(args[0]), builder.dequantize(args[1])], f"{path}.out", f"{path}/Mul")
    return builder.quantize(out, path, TensorQuant("int8", (op.output_scale,)))


@QDQ_UNITS.register(Op.MATMUL)
def _matmul(builder: QDQBuilder, node: fx.Node, op: IntMatMul, args: list[Any]) -> Any:
    """The standard ``MatMul`` of two dequantized activations (no weight: the reader tells it from a linear
    layer by its second input)."""
    path = builder.path(node)
    out = builder.node("MatMul", [builder.dequantize(args[0]), builder.dequantize(args[1])], f"{path}.out", f"{path}/MatMul")
    return builder.quantize(out, path, TensorQuant("int8", (op.output_scale,)))


@QDQ_UNITS.register(Op.CONCAT)
def _concat(builder: QDQBuilder, node: fx.Node, op: IntConcat, args: list[Any]) -> Any:
    path = builder.path(node)
    out = builder.node("Concat", [builder.dequantize(a) for a in args], f"{path}.out", f"{path}/Concat", axis=op.dim)
    return builder.finish(node, out, TensorQuant("int8", (op.output_scale,)), None)


@QDQ_UNITS.register(Op.MAX_POOL2D)
def _max_pool(builder: QDQBuilder, node: fx.Node, op: IntMaxPool2d, args: list[Any]) -> Any:
    path = builder.path(node)
    out = builder.node(
        "MaxPool", [builder.dequantize(args[0])], f"{path}.out", f"{path}/MaxPool", kernel_shape=list(op.kernel_size),
        strides=list(op.stride), pads=[*op.padding, *op.padding], dilations=list(op.dilation), ceil_mode=int(op.ceil_mode),
    )
    return builder.finish(node, out, args[0].quant, None)


@QDQ_UNITS.register(Op.AVG_POOL2D)
def _avg_pool(builder: QDQBuilder, node: fx.Node, op: IntAvgPool2d, args: list[Any]) -> Any:
    path = builder.path(node)
    out = builder.node(
        "AveragePool", [builder.dequantize(args[0])], f"{path}.out", f"{path}/AveragePool",
        kernel_shape=list(op.kernel_size), strides=list(op.stride), pads=[*op.padding, *op.padding], count_include_pad=1,
    )
    return builder.finish(node, out, TensorQuant("int8", (op.output_scale,)), None)


@QDQ_UNITS.register(Op.GLOBAL_AVG_POOL2D)
def _global_avg_pool(builder: QDQBuilder, node: fx.Node, op: IntGlobalAvgPool2d, args: list[Any]) -> Any:
    path = builder.path(node)
    quant = TensorQuant("int8", (op.output_scale,))
    stem = path if op.keepdim else f"{path}.keepdim"
    out = builder.node("GlobalAveragePool", [builder.dequantize(args[0])], f"{stem}.out", f"{path}/GlobalAveragePool")
    if op.keepdim:
        return builder.quantize(out, path, quant)
    pooled = builder.quantize(out, stem, quant)
    return builder.reshape(path, pooled, tuple(builder.values[node].shape))


@QDQ_UNITS.register(Op.RELU)
def _clamp(builder: QDQBuilder, node: fx.Node, op: IntClamp, args: list[Any]) -> Any:
    return builder.clamped(builder.path(node), args[0], (op.low, op.high))


@QDQ_UNITS.register(Op.UPSAMPLE_NEAREST2D)
def _upsample(builder: QDQBuilder, node: fx.Node, op: IntUpsampleNearest2d, args: list[Any]) -> Any:
    path = builder.path(node)
    scales = builder.initializer(f"{path}.scales", np.array([1.0, 1.0, *op.scale_factor], dtype=np.float32))
    out = builder.node(
        "Resize", [builder.dequantize(args[0]), "", scales], f"{path}.out", f"{path}/Resize",
        mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
    )
    return builder.quantize(out, path, args[0].quant)


@QDQ_UNITS.register(Op.UPSAMPLE_BILINEAR2D)
def _bilinear(builder: QDQBuilder, node: fx.Node, op: IntUpsampleBilinear2d, args: list[Any]) -> Any:
    """``Resize`` (``linear``, to the output's ``sizes``) with the coordinates of docs/numerics.md: ``half_pixel``,
    whose edge clamping equals torch's clamp at 0, or ``align_corners``."""
    path = builder.path(node)
    sizes = builder.initializer(f"{path}.sizes", np.array(builder.values[node].shape, dtype=np.int64))
    out = builder.node(
        "Resize", [builder.dequantize(args[0]), "", "", sizes], f"{path}.out", f"{path}/Resize", mode="linear",
        coordinate_transformation_mode="align_corners" if op.align_corners else "half_pixel",
    )
    return builder.quantize(out, path, TensorQuant("int8", (op.output_scale,)))


@QDQ_UNITS.register(*LOOKUP_TABLE_OPS)
def _lookup_table(builder: QDQBuilder, node: fx.Node, op: IntLookupTable, args: list[Any]) -> Any:
    """The activation's own ONNX op; a gated one (SiLU, Hardswish) as ``Mul(x, g(x))``."""
    path = builder.path(node)
    source = builder.dequantize(args[0])
    gate = Op(op.op.info.gated) if op.op.info.gated else op.op
    op_type = gate.info.onnx_types[0]
    attributes = {"alpha": op.alpha} if gate.info.alpha else HARDSIGMOID_ATTRIBUTES if gate is Op.HARDSIGMOID else {}
    if gate is op.op:
        out = builder.node(op_type, [source], f"{path}.out", f"{path}/{op_type}", **attributes)
        if op_type in CONTRIB_OPS:  # ONNX has no schema for it: shape inference cannot give its output a shape
            builder.value_infos.append(value_info(out, builder.values[node]))
    else:
        gated = builder.node(op_type, [source], f"{path}.gate", f"{path}/{op_type}", **attributes)
        out = builder.node("Mul", [source, gated], f"{path}.out", f"{path}/Mul")
    return builder.quantize(out, path, TensorQuant("int8", (op.output_scale,)))


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def _holds_qtensor(args: Any) -> bool:
    found: list[bool] = []

    def visit(value: Any) -> None:
        if isinstance(value, (QTensor, Int32Result)):
            found.append(True)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    visit(args)
    return bool(found)


def _graph_name(int_model: IntegerModel) -> str:
    return type(int_model.graph_module).__name__


def to_onnx(
    model: IntegerModel | fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Write the QDQ ONNX file of an integer model (or of a prepared QAT model, converted first).

    Inputs are named after the forward's arguments and outputs after the DeQuantStub modules, unless
    ``input_names`` / ``output_names`` say otherwise. Shapes are those of ``example_inputs``. The file passes
    ``onnx.checker.check_model(full_check=True)`` and is written atomically: a failure leaves no file.

    Raises:
        ExportError: an op or value with no QDQ form, naming the node.
        QuantizationError: a prepared model that cannot be converted.
    """
    from edgeq.quantization.convert import convert_fx

    int_model = model if isinstance(model, IntegerModel) else convert_fx(model)
    onnx_model = build_onnx(int_model, tuple(example_inputs), input_names, output_names)
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except onnx.checker.ValidationError as error:  # a bug in the writer, not in the user's model
        raise ExportError(f"edgeq wrote an invalid ONNX graph (please report): {error}") from error
    with atomic_write(path) as temporary:
        onnx.save(onnx_model, str(temporary))
    return Path(path)
