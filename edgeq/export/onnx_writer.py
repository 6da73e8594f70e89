"""The integer model as a standard QDQ ONNX file, written node by node with the onnx helper API.

Every integer tensor appears as ``QuantizeLinear`` (float -> int8, scalar scale, zero point 0) followed by
``DequantizeLinear`` where it is consumed; each op runs between a DequantizeLinear and a QuantizeLinear, as
ONNX Runtime's ``quantize_static`` writes it and as TensorRT, OpenVINO and TVM read it. Weights are int8
initializers with a per-channel DequantizeLinear (axis 0), biases int32 initializers with a per-channel
DequantizeLinear at scale ``s_in * s_w[c]``; BatchNorm is already folded. An int32 output (the high-precision
mode) is the float output of its Conv/Gemm, not quantized again.

Names are stable and readable: an op at module path ``P`` (or fx node name, for functional data movement) is
node ``P/<OpType>`` with float output ``P.out``; the op's int8 result is ``P.q`` (``P.0.q``, ``P.1.q``... for the
outputs of a split) and its dequantized copy ``P.q.dq``; with a fused ReLU/ReLU6 the op's saturated output is
``P.preact.q``, followed by ``P/Relu`` or ``P/Clip``; weights are ``P.weight_q`` and ``P.bias_q``.
Shapes are static: those of the example inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from edgeq import __version__
from edgeq.errors import ExportError
from edgeq.export.float_onnx import emit_float_op
from edgeq.fileio import atomic_write
from edgeq.numerics import bias_scales
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable
from edgeq.quantization import integer_ops as ops
from edgeq.quantization.graph import record_values
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.patterns import Movement, OpKind, movement, op_kind, permutation, split_axis
from edgeq.quantization.qat_modules import CONSTANT_KEY, FLOAT_REASON_KEY

OPSET = 13
"""Per-axis QuantizeLinear / DequantizeLinear arrived in opset 13, the oldest opset every QDQ consumer reads
(ONNX Runtime, TensorRT 8+, OpenVINO, TVM); nothing edgeq writes needs a newer one."""

CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPS = frozenset({"Gelu", "FastGelu"})
"""ONNX Runtime's contrib ops edgeq writes, for GELU and its tanh form: ONNX's own ``Gelu`` (with ``approximate``)
arrived in opset 20, and the arithmetic that defines it (as the float fallback writes it) would be six nodes that
no reader knows as one op. ORT runs both, and TVM's ONNX frontend imports them (as ``nn.gelu`` and as FastGelu's
arithmetic); they need the ``com.microsoft`` opset import (version 1), which a file gets only when it uses them."""

HARDSIGMOID_ATTRIBUTES = {"alpha": 1 / 6, "beta": 0.5}
"""PyTorch's Hardsigmoid, ``relu6(x + 3) / 6``, as ONNX HardSigmoid ``clip(alpha * x + beta, 0, 1)``."""

TARGET_METADATA_KEY = "edgeq.target"
"""``metadata_props`` key holding the name of the target the model was quantized for."""


Emitter = Callable[["_Builder", fx.Node, Any, list[Any]], Any]

EMITTERS: OpTable[Emitter] = OpTable("QDQ unit in onnx_writer.py", lambda info: not info.movement)
"""How each op's integer op becomes its QDQ unit (a method of ``_Builder``); ops that only move values are
written from their fx node (``_Builder._move``)."""


@dataclass(frozen=True)
class _QTensor:
    """An integer tensor of the ONNX graph: its name (a QuantizeLinear output) and quantization."""

    name: str
    quant: ops.TensorQuant


@dataclass(frozen=True)
class _FloatTensor:
    """A float tensor of the float fallback: a dequantized integer tensor, or the result of an op left in float."""

    name: str


@dataclass(frozen=True)
class _FloatConstant:
    """A constant tensor (a parameter, or computed from parameters alone): written, as the integer model computes
    it, only where it is read: quantized for the integer region, float for an op left in float."""

    node: fx.Node


@dataclass(frozen=True)
class _Int32Result:
    """The float output of a Conv/Gemm that stands for its int32 accumulator (high-precision output)."""

    name: str
    quant: ops.TensorQuant


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
    return _Builder(int_model, values, input_names, output_names).build()


class _Builder:
    """Emits ONNX nodes for the nodes of an integer graph (one instance per export)."""

    def __init__(
        self,
        int_model: IntegerModel,
        values: dict[fx.Node, Any],
        input_names: Sequence[str] | None,
        output_names: Sequence[str] | None,
    ) -> None:
        self.int_model = int_model
        self.graph = int_model.graph_module.graph
        self.modules = dict(int_model.graph_module.named_modules())
        self.values = values
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_infos: list[onnx.ValueInfoProto] = []
        self.env: dict[fx.Node, Any] = {}
        self.dequantized: dict[str, str] = {}
        self.quant_initializers: dict[str, tuple[str, str]] = {}
        self.float_constants: set[str] = set()
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        dequantizers = [n for n in self.graph.nodes if n.op == "call_module" and isinstance(self.modules[n.target], ops.IntDequantize)]
        self.input_names = self._names("input", input_names, [n.name for n in placeholders])
        self.output_names = dict(zip(dequantizers, self._names("output", output_names, [str(n.target) for n in dequantizers])))
        self.boundaries: dict[type, Emitter] = {
            ops.IntQuantize: _Builder._quantize_input,
            ops.IntDequantize: _Builder._dequantize_output,
            ops.IntEnterFloat: _Builder._enter_float,
            ops.IntLeaveFloat: _Builder._quantize_input,
        }

    def _emitter(self, module: torch.nn.Module) -> Emitter | None:
        op = ops.INTEGER_OPS.op_of_instance(module)
        return EMITTERS[op] if op is not None else self.boundaries.get(type(module))

    @staticmethod
    def _names(kind: str, chosen: Sequence[str] | None, defaults: list[str]) -> list[str]:
        if chosen is None:
            return defaults
        chosen = list(chosen)
        if len(chosen) != len(defaults) or len(set(chosen)) != len(chosen):
            raise ExportError(f"{kind}_names: expected {len(defaults)} distinct names; got {chosen}")
        return chosen

    # ---- driver -----------------------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        inputs: list[onnx.ValueInfoProto] = []
        outputs: list[onnx.ValueInfoProto] = []
        placeholder_names = iter(self.input_names)
        for node in self.graph.nodes:
            if node.op == "placeholder":
                name = next(placeholder_names)
                inputs.append(_value_info(name, self.values[node]))
                self.env[node] = name
            elif node.op == "output":
                results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
                outputs.extend(_value_info(self.env[result], self.values[result]) for result in results)
            else:
                self.env[node] = self._emit(node)
        graph = helper.make_graph(
            self.nodes, _graph_name(self.int_model), inputs, outputs, self.initializers, value_info=self.value_infos
        )
        standard = helper.make_opsetid("", OPSET)
        contrib = [helper.make_opsetid(CONTRIB_DOMAIN, 1)] if any(n.domain == CONTRIB_DOMAIN for n in self.nodes) else []
        model = helper.make_model(
            graph, opset_imports=[standard, *contrib], producer_name="edgeq", producer_version=__version__
        )
        model.ir_version = helper.find_min_ir_version_for([standard])
        helper.set_model_props(model, {TARGET_METADATA_KEY: self.int_model.target})
        return model

    def _emit(self, node: fx.Node) -> Any:
        args = list(fx.node.map_arg(node.args, self.env.__getitem__))
        emitter = self._emitter(self.modules[node.target]) if node.op == "call_module" else None
        if emitter is not None:
            return emitter(self, node, self.modules[node.target], args)
        value = self.values[node]
        if not (isinstance(value, torch.Tensor) or _holds_tensor(value)):
            return value  # shape arithmetic (x.size(), //): its value is static
        if CONSTANT_KEY in node.meta:
            return _FloatConstant(node)
        if FLOAT_REASON_KEY in node.meta:
            return self._float_op(node, [*args, *fx.node.map_arg(node.kwargs, self.env.__getitem__).values()])
        if not _holds_qtensor(args):
            raise ExportError(
                f"'{node.name}' ({node.target}): float ops outside the QuantStub/DeQuantStub region cannot be "
                "exported; keep pre- and post-processing out of the model you export"
            )
        if op_kind(node, self.modules) is not OpKind.RESHAPE:
            raise ExportError(f"'{node.name}': {node.target} on an integer tensor has no QDQ form")
        return self._move(node, args)

    # ---- ONNX building blocks ---------------------------------------------------------------------------------
    def _initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def _node(self, op_type: str, inputs: list[str], output: str, name: str, **attributes: Any) -> str:
        domain = CONTRIB_DOMAIN if op_type in CONTRIB_OPS else None
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, domain=domain, **attributes))
        return output

    def _quant_initializers(self, tensor: str, quant: ops.TensorQuant) -> tuple[str, str]:
        if tensor not in self.quant_initializers:
            per_channel = quant.axis is not None
            scales = np.asarray(quant.scales, dtype=np.float32)
            zero_dtype = np.int8 if quant.dtype == "int8" else np.int32
            zeros = np.zeros(len(quant.scales), dtype=zero_dtype)
            self.quant_initializers[tensor] = (
                self._initializer(f"{tensor}.scale", scales if per_channel else scales[0]),
                self._initializer(f"{tensor}.zero_point", zeros if per_channel else zeros[0]),
            )
        return self.quant_initializers[tensor]

    def _quantize(self, float_name: str, path: str, quant: ops.TensorQuant) -> _QTensor:
        tensor = f"{path}.q"
        scale, zero = self._quant_initializers(tensor, quant)
        self._node("QuantizeLinear", [float_name, scale, zero], tensor, f"{path}/QuantizeLinear", **_axis(quant))
        return _QTensor(tensor, quant)

    def _dequantize(self, value: _QTensor, output: str | None = None) -> str:
        if output is None and value.name in self.dequantized:
            return self.dequantized[value.name]
        scale, zero = self._quant_initializers(value.name, value.quant)
        name = output or f"{value.name}.dq"
        self._node("DequantizeLinear", [value.name, scale, zero], name, f"{name}/DequantizeLinear", **_axis(value.quant))
        if output is None:
            self.dequantized[value.name] = name
        return name

    def _constant_dequantized(self, path: str, values: torch.Tensor, scales: Sequence[float], axis: int) -> str:
        quant = ops.TensorQuant("int8" if values.dtype == torch.int8 else "int32", tuple(scales), axis=axis)
        name = self._initializer(path, values.numpy())
        return self._dequantize(_QTensor(name, quant), output=f"{path}.dq")

    # ---- integer ops ------------------------------------------------------------------------------------------
    def _path(self, node: fx.Node) -> str:
        return str(node.target) if node.op == "call_module" else node.name

    def _quantize_input(self, node: fx.Node, op: ops.IntQuantize, args: list[Any]) -> _QTensor:
        """A QuantStub (a model input), the quantize after an op left in float, or a constant's int8 values (those
        the integer model computes, as an initializer: the standard QDQ form of a quantized constant)."""
        quant = ops.TensorQuant("int8", (op.output_scale,))
        if isinstance(args[0], _FloatConstant):
            return _QTensor(self._initializer(f"{self._path(node)}.q", self.values[node].numpy()), quant)
        source = args[0].name if isinstance(args[0], _FloatTensor) else args[0]
        return self._quantize(source, self._path(node), quant)

    def _dequantize_output(self, node: fx.Node, op: ops.IntDequantize, args: list[Any]) -> str:
        value = args[0]
        if isinstance(value, _Int32Result):
            return value.name
        return self._dequantize(value, output=self.output_names[node])

    def _enter_float(self, node: fx.Node, op: ops.IntEnterFloat, args: list[Any]) -> _FloatTensor:
        return _FloatTensor(self._dequantize(args[0]))

    def _float_op(self, node: fx.Node, args: list[Any]) -> _FloatTensor:
        """An op left in float (docs/numerics.md "Float fallback"): its float ONNX nodes, reading the float tensors
        among ``args`` (its arguments, then its keyword arguments' values) in order."""
        inputs: list[str] = []
        fx.node.map_aggregate(args, lambda a: inputs.append(self._float_name(a)) if isinstance(a, (_FloatTensor, _FloatConstant)) else None)
        module = self.modules[node.target] if node.op == "call_module" else None
        value = self.values[node]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
        output = emit_float_op(self, node, module, inputs, shape, self._path(node), node.meta[FLOAT_REASON_KEY])
        return _FloatTensor(output)

    def _float_name(self, value: _FloatTensor | _FloatConstant) -> str:
        """The ONNX name of a float tensor; a constant's float values become an initializer the first time."""
        if isinstance(value, _FloatTensor):
            return value.name
        name = value.node.name
        if name not in self.float_constants:
            self.float_constants.add(self._initializer(name, self.values[value.node].detach().numpy()))
        return name

    def _finish(self, node: fx.Node, float_name: str, quant: ops.TensorQuant, clamp: tuple[int, int] | None) -> Any:
        path = self._path(node)
        if quant.dtype == "int32":
            return _Int32Result(float_name, quant)
        if clamp is None or clamp == (-128, 127):
            return self._quantize(float_name, path, quant)
        return self._clamped(path, self._quantize(float_name, f"{path}.preact", quant), clamp)

    def _clamped(self, path: str, value: _QTensor, clamp: tuple[int, int]) -> _QTensor:
        """A ReLU/ReLU6 as DequantizeLinear -> Relu/Clip -> QuantizeLinear at the same scale.

        For a fused activation ``value`` is the op's saturated pre-activation (``P.preact.q``): clamping after
        saturation is what requantization with a clamp computes, every op keeps its standard QDQ unit, and ONNX
        Runtime runs the op itself in integers.
        """
        scale = value.quant.scale
        source = self._dequantize(value)
        if clamp == (0, 127):
            out = self._node("Relu", [source], f"{path}.relu", f"{path}/Relu")
        else:
            low = self._initializer(f"{path}.clip.min", np.array(clamp[0] * scale, dtype=np.float32))
            high = self._initializer(f"{path}.clip.max", np.array(clamp[1] * scale, dtype=np.float32))
            out = self._node("Clip", [source, low, high], f"{path}.clip", f"{path}/Clip")
        return self._quantize(out, path, value.quant)

    def _float_output_name(self, node: fx.Node, op: ops._WeightedOp) -> str:
        users = list(node.users)
        if op.output.dtype == "int32" and len(users) == 1 and users[0] in self.output_names:
            return self.output_names[users[0]]
        return f"{self._path(node)}.out"

    def _weights(self, path: str, op: ops._WeightedOp, transposed: bool = False) -> tuple[str, str]:
        weight = op.weight.t().contiguous() if transposed else op.weight
        weight_name = self._constant_dequantized(f"{path}.weight_q", weight, op.weight_scales, axis=1 if transposed else 0)
        bias_name = self._constant_dequantized(f"{path}.bias_q", op.bias, bias_scales(op.input_scale, op.weight_scales), axis=0)
        return weight_name, bias_name

    @EMITTERS.register(Op.CONV2D)
    def _conv(self, node: fx.Node, op: ops.IntConv2d, args: list[Any]) -> Any:
        path = self._path(node)
        weight, bias = self._weights(path, op)
        out = self._node(
            "Conv", [self._dequantize(args[0]), weight, bias], self._float_output_name(node, op), f"{path}/Conv",
            kernel_shape=list(op.weight.shape[2:]), strides=list(op.stride), dilations=list(op.dilation),
            pads=[*op.padding, *op.padding], group=op.groups,
        )
        return self._finish(node, out, op.output, op.clamp)

    @EMITTERS.register(Op.LINEAR)
    def _linear(self, node: fx.Node, op: ops.IntLinear, args: list[Any]) -> Any:
        path = self._path(node)
        source = self._dequantize(args[0])
        output = self._float_output_name(node, op)
        if self.values[node.args[0]].dim() == 2:
            weight, bias = self._weights(path, op)
            out = self._node("Gemm", [source, weight, bias], output, f"{path}/Gemm", transB=1)
        else:
            weight, bias = self._weights(path, op, transposed=True)
            product = self._node("MatMul", [source, weight], f"{path}.matmul", f"{path}/MatMul")
            out = self._node("Add", [product, bias], output, f"{path}/Add")
        return self._finish(node, out, op.output, op.clamp)

    @EMITTERS.register(Op.ADD)
    def _add(self, node: fx.Node, op: ops.IntAdd, args: list[Any]) -> Any:
        path = self._path(node)
        out = self._node("Add", [self._dequantize(args[0]), self._dequantize(args[1])], f"{path}.out", f"{path}/Add")
        return self._finish(node, out, ops.TensorQuant("int8", (op.output_scale,)), op.clamp)

    @EMITTERS.register(Op.MUL)
    def _mul(self, node: fx.Node, op: ops.IntMul, args: list[Any]) -> Any:
        path = self._path(node)
        out = self._node("Mul", [self._dequantize(args[0]), self._dequantize(args[1])], f"{path}.out", f"{path}/Mul")
        return self._quantize(out, path, ops.TensorQuant("int8", (op.output_scale,)))

    @EMITTERS.register(Op.MATMUL)
    def _matmul(self, node: fx.Node, op: ops.IntMatMul, args: list[Any]) -> Any:
        """The standard ``MatMul`` of two dequantized activations (no weight: the reader tells it from a linear
        layer by its second input)."""
        path = self._path(node)
        out = self._node("MatMul", [self._dequantize(args[0]), self._dequantize(args[1])], f"{path}.out", f"{path}/MatMul")
        return self._quantize(out, path, ops.TensorQuant("int8", (op.output_scale,)))

    @EMITTERS.register(Op.CONCAT)
    def _concat(self, node: fx.Node, op: ops.IntConcat, args: list[Any]) -> Any:
        path = self._path(node)
        out = self._node("Concat", [self._dequantize(a) for a in args], f"{path}.out", f"{path}/Concat", axis=op.dim)
        return self._finish(node, out, ops.TensorQuant("int8", (op.output_scale,)), None)

    @EMITTERS.register(Op.MAX_POOL2D)
    def _max_pool(self, node: fx.Node, op: ops.IntMaxPool2d, args: list[Any]) -> Any:
        path = self._path(node)
        out = self._node(
            "MaxPool", [self._dequantize(args[0])], f"{path}.out", f"{path}/MaxPool", kernel_shape=list(op.kernel_size),
            strides=list(op.stride), pads=[*op.padding, *op.padding], dilations=list(op.dilation), ceil_mode=int(op.ceil_mode),
        )
        return self._finish(node, out, args[0].quant, None)

    @EMITTERS.register(Op.AVG_POOL2D)
    def _avg_pool(self, node: fx.Node, op: ops.IntAvgPool2d, args: list[Any]) -> Any:
        path = self._path(node)
        out = self._node(
            "AveragePool", [self._dequantize(args[0])], f"{path}.out", f"{path}/AveragePool",
            kernel_shape=list(op.kernel_size), strides=list(op.stride), pads=[*op.padding, *op.padding], count_include_pad=1,
        )
        return self._finish(node, out, ops.TensorQuant("int8", (op.output_scale,)), None)

    @EMITTERS.register(Op.GLOBAL_AVG_POOL2D)
    def _global_avg_pool(self, node: fx.Node, op: ops.IntGlobalAvgPool2d, args: list[Any]) -> Any:
        path = self._path(node)
        quant = ops.TensorQuant("int8", (op.output_scale,))
        stem = path if op.keepdim else f"{path}.keepdim"
        out = self._node("GlobalAveragePool", [self._dequantize(args[0])], f"{stem}.out", f"{path}/GlobalAveragePool")
        if op.keepdim:
            return self._quantize(out, path, quant)
        pooled = self._quantize(out, stem, quant)
        return self._reshape(path, pooled, tuple(self.values[node].shape))

    @EMITTERS.register(Op.RELU)
    def _clamp(self, node: fx.Node, op: ops.IntClamp, args: list[Any]) -> Any:
        return self._clamped(self._path(node), args[0], (op.low, op.high))

    @EMITTERS.register(Op.UPSAMPLE_NEAREST2D)
    def _upsample(self, node: fx.Node, op: ops.IntUpsampleNearest2d, args: list[Any]) -> Any:
        path = self._path(node)
        scales = self._initializer(f"{path}.scales", np.array([1.0, 1.0, *op.scale_factor], dtype=np.float32))
        out = self._node(
            "Resize", [self._dequantize(args[0]), "", scales], f"{path}.out", f"{path}/Resize",
            mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor",
        )
        return self._quantize(out, path, args[0].quant)

    @EMITTERS.register(Op.UPSAMPLE_BILINEAR2D)
    def _bilinear(self, node: fx.Node, op: ops.IntUpsampleBilinear2d, args: list[Any]) -> Any:
        """``Resize`` (``linear``, to the output's ``sizes``) with the coordinates of docs/numerics.md: ``half_pixel``,
        whose edge clamping equals torch's clamp at 0, or ``align_corners``."""
        path = self._path(node)
        sizes = self._initializer(f"{path}.sizes", np.array(self.values[node].shape, dtype=np.int64))
        out = self._node(
            "Resize", [self._dequantize(args[0]), "", "", sizes], f"{path}.out", f"{path}/Resize", mode="linear",
            coordinate_transformation_mode="align_corners" if op.align_corners else "half_pixel",
        )
        return self._quantize(out, path, ops.TensorQuant("int8", (op.output_scale,)))

    @EMITTERS.register(*LOOKUP_TABLE_OPS)
    def _lookup_table(self, node: fx.Node, op: ops.IntLookupTable, args: list[Any]) -> Any:
        """The activation's own ONNX op; a gated one (SiLU, Hardswish) as ``Mul(x, g(x))``."""
        path = self._path(node)
        source = self._dequantize(args[0])
        gate = Op(op.op.info.gated) if op.op.info.gated else op.op
        op_type = gate.info.onnx_types[0]
        attributes = {"alpha": op.alpha} if gate is Op.LEAKYRELU else HARDSIGMOID_ATTRIBUTES if gate is Op.HARDSIGMOID else {}
        if gate is op.op:
            out = self._node(op_type, [source], f"{path}.out", f"{path}/{op_type}", **attributes)
            if op_type in CONTRIB_OPS:  # ONNX has no schema for it: shape inference cannot give its output a shape
                self.value_infos.append(_value_info(out, self.values[node]))
        else:
            gated = self._node(op_type, [source], f"{path}.gate", f"{path}/{op_type}", **attributes)
            out = self._node("Mul", [source, gated], f"{path}.out", f"{path}/Mul")
        return self._quantize(out, path, ops.TensorQuant("int8", (op.output_scale,)))

    # ---- data movement ----------------------------------------------------------------------------------------
    def _reshape(self, path: str, value: _QTensor, shape: tuple[int, ...]) -> _QTensor:
        target = self._initializer(f"{path}.shape", np.array(shape, dtype=np.int64))
        out = self._node("Reshape", [self._dequantize(value), target], f"{path}.out", f"{path}/Reshape")
        return self._quantize(out, path, value.quant)

    def _move(self, node: fx.Node, args: list[Any]) -> Any:
        kind = movement(node, self.modules)
        source = args[0]
        path = self._path(node)
        if kind is Movement.ALIAS:
            return source
        if kind is Movement.GETITEM and isinstance(source, tuple):
            return source[args[1]]
        output = self.values[node]
        if kind is Movement.RESHAPE:
            return self._reshape(path, source, tuple(output.shape))
        rank = self.values[node.args[0]].dim()
        if kind is Movement.TRANSPOSE:
            out = self._node("Transpose", [self._dequantize(source)], f"{path}.out", f"{path}/Transpose", perm=permutation(node, rank))
            return self._quantize(out, path, source.quant)
        if kind is Movement.SPLIT:
            axis = split_axis(node, rank)
            sizes = self._initializer(f"{path}.split", np.array([t.shape[axis] for t in output], dtype=np.int64))
            names = [f"{path}.out{i}" for i in range(len(output))]
            self.nodes.append(helper.make_node("Split", [self._dequantize(source), sizes], names, name=f"{path}/Split", axis=axis))
            return tuple(self._quantize(name, f"{path}.{i}", source.quant) for i, name in enumerate(names))
        return self._slice(node, path, source, args[1], rank, tuple(output.shape))

    def _slice(self, node: fx.Node, path: str, source: _QTensor, index: Any, rank: int, shape: tuple[int, ...]) -> _QTensor:
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1 :]
        starts, ends, axes, steps = [], [], [], []
        for axis, item in enumerate(index):
            if isinstance(item, int):
                starts.append(item), ends.append(item + 1 if item != -1 else 2**62), axes.append(axis), steps.append(1)
            elif isinstance(item, slice) and (item.step or 1) > 0:
                if item == slice(None):
                    continue
                starts.append(item.start or 0), ends.append(2**62 if item.stop is None else item.stop)
                axes.append(axis), steps.append(item.step or 1)
            else:
                raise ExportError(f"'{node.name}': indexing with {item!r} has no export (allowed: ints and slices with positive steps)")
        arrays = [np.array(v, dtype=np.int64) for v in (starts, ends, axes, steps)]
        names = [self._initializer(f"{path}.{part}", a) for part, a in zip(("starts", "ends", "axes", "steps"), arrays)]
        stem = path if len(shape) == rank else f"{path}.slice"
        out = self._node("Slice", [self._dequantize(source), *names], f"{stem}.out", f"{path}/Slice")
        if len(shape) == rank:
            return self._quantize(out, path, source.quant)
        return self._reshape(path, self._quantize(out, stem, source.quant), shape)


def _axis(quant: ops.TensorQuant) -> dict[str, int]:
    return {} if quant.axis is None else {"axis": quant.axis}


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def _holds_qtensor(args: Any) -> bool:
    found: list[bool] = []

    def visit(value: Any) -> None:
        if isinstance(value, (_QTensor, _Int32Result)):
            found.append(True)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    visit(args)
    return bool(found)


def _value_info(name: str, value: torch.Tensor) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape))


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
