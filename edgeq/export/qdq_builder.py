"""The QDQ ONNX graph under construction: names, Q/DQ pairs, initializers, the float fallback's boundaries and data
movement, which every QDQ unit of :mod:`edgeq.export.onnx_writer` writes with.

Names are stable and readable: an op at module path ``P`` (or fx node name, for functional data movement) is
node ``P/<OpType>`` with float output ``P.out``; the op's int8 result is ``P.q`` (``P.0.q``, ``P.1.q``... for the
outputs of a split) and its dequantized copy ``P.q.dq``; with a fused ReLU/ReLU6 the op's saturated output is
``P.preact.q``, followed by ``P/Relu`` or ``P/Clip``; weights are ``P.weight_q`` and ``P.bias_q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import ExportError
from edgeq.export.float_onnx import OPSETS, emit_float_op
from edgeq.numerics import bias_exponents, bias_scales, float32
from edgeq.ops import Op
from edgeq.quantization.integer_model import IntegerModel
from edgeq.quantization.integer_ops import IntDequantize, IntEnterFloat, IntQuantize, TensorQuant, _WeightedOp
from edgeq.quantization.patterns import PreFusionOp, is_flattened_roll, padding, permutation, roll_shifts, slice_index, source_op, split_axis
from edgeq.quantization.qat_modules import FLOAT_REASON_KEY

CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPS = frozenset({"Gelu", "FastGelu"})
"""ONNX Runtime's contrib ops edgeq writes, for GELU and its tanh form: ONNX's own ``Gelu`` (with ``approximate``)
arrived in opset 20, and the arithmetic that defines it (as the float fallback writes it) would be six nodes that
no reader knows as one op. ORT runs both, and TVM's ONNX frontend imports them (as ``nn.gelu`` and as FastGelu's
arithmetic); they need the ``com.microsoft`` opset import (version 1), which a file gets only when it uses them."""


@dataclass(frozen=True)
class QTensor:
    """An integer tensor of the ONNX graph: its name (a QuantizeLinear output) and quantization."""

    name: str
    quant: TensorQuant


@dataclass(frozen=True)
class FloatTensor:
    """A float tensor of the float fallback: a dequantized integer tensor, or the result of an op left in float."""

    name: str


@dataclass(frozen=True)
class FloatConstant:
    """A constant tensor (a parameter, or computed from parameters alone): written, as the integer model computes
    it, only where it is read: quantized for the integer region, float for an op left in float."""

    node: fx.Node


@dataclass(frozen=True)
class Int32Result:
    """The float output of a Conv/Gemm that stands for its int32 accumulator (high-precision output)."""

    name: str
    quant: TensorQuant


class QDQBuilder:
    """The ONNX graph of an integer model under construction (one instance per export): its nodes, initializers and
    the ONNX value of each fx node so far, and the building blocks every QDQ unit writes with."""

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
        self.opset = OPSETS[0]
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        dequantizers = [n for n in self.graph.nodes if n.op == "call_module" and isinstance(self.modules[n.target], IntDequantize)]
        self.input_names = self._names("input", input_names, [n.name for n in placeholders])
        self.output_names = dict(zip(dequantizers, self._names("output", output_names, [str(n.target) for n in dequantizers])))

    @staticmethod
    def _names(kind: str, chosen: Sequence[str] | None, defaults: list[str]) -> list[str]:
        if chosen is None:
            return defaults
        chosen = list(chosen)
        if len(chosen) != len(defaults) or len(set(chosen)) != len(chosen):
            raise ExportError(f"{kind}_names: expected {len(defaults)} distinct names; got {chosen}")
        return chosen


    # ---- ONNX building blocks ---------------------------------------------------------------------------------
    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node(self, op_type: str, inputs: list[str], output: str, name: str, **attributes: Any) -> str:
        domain = CONTRIB_DOMAIN if op_type in CONTRIB_OPS else None
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, domain=domain, **attributes))
        return output

    def _quant_initializers(self, tensor: str, quant: TensorQuant) -> tuple[str, str]:
        if tensor not in self.quant_initializers:
            per_channel = quant.axis is not None
            scales = np.asarray(quant.scales, dtype=np.float32)
            zero_dtype = np.int8 if quant.dtype == "int8" else np.int32
            zeros = np.zeros(len(quant.scales), dtype=zero_dtype)
            self.quant_initializers[tensor] = (
                self.initializer(f"{tensor}.scale", scales if per_channel else scales[0]),
                self.initializer(f"{tensor}.zero_point", zeros if per_channel else zeros[0]),
            )
        return self.quant_initializers[tensor]

    def quantize(self, float_name: str, path: str, quant: TensorQuant) -> QTensor:
        tensor = f"{path}.q"
        scale, zero = self._quant_initializers(tensor, quant)
        self.node("QuantizeLinear", [float_name, scale, zero], tensor, f"{path}/QuantizeLinear", **_axis(quant))
        return QTensor(tensor, quant)

    def dequantize(self, value: QTensor, output: str | None = None) -> str:
        if output is None and value.name in self.dequantized:
            return self.dequantized[value.name]
        scale, zero = self._quant_initializers(value.name, value.quant)
        name = output or f"{value.name}.dq"
        self.node("DequantizeLinear", [value.name, scale, zero], name, f"{name}/DequantizeLinear", **_axis(value.quant))
        if output is None:
            self.dequantized[value.name] = name
        return name

    def _constant_dequantized(self, path: str, values: torch.Tensor, scales: Sequence[float], axis: int) -> str:
        quant = TensorQuant("int8" if values.dtype == torch.int8 else "int32", tuple(scales), axis=axis)
        name = self.initializer(path, values.numpy())
        return self.dequantize(QTensor(name, quant), output=f"{path}.dq")

    # ---- boundaries of the integer region and of the float fallback ------------------------------------------
    def path(self, node: fx.Node) -> str:
        return str(node.target) if node.op == "call_module" else node.name

    def quantize_input(self, node: fx.Node, op: IntQuantize, args: list[Any]) -> QTensor:
        """A QuantStub (a model input), the quantize after an op left in float, or a constant's int8 values (those
        the integer model computes, as an initializer: the standard QDQ form of a quantized constant)."""
        quant = TensorQuant("int8", (op.output_scale,))
        if isinstance(args[0], FloatConstant):
            return QTensor(self.initializer(f"{self.path(node)}.q", self.values[node].numpy()), quant)
        source = args[0].name if isinstance(args[0], FloatTensor) else args[0]
        return self.quantize(source, self.path(node), quant)

    def dequantize_output(self, node: fx.Node, op: IntDequantize, args: list[Any]) -> str:
        value = args[0]
        if isinstance(value, Int32Result):
            return value.name
        return self.dequantize(value, output=self.output_names[node])

    def enter_float(self, node: fx.Node, op: IntEnterFloat, args: list[Any]) -> FloatTensor:
        return FloatTensor(self.dequantize(args[0]))

    def float_op(self, node: fx.Node) -> Any:
        """An op left in float (docs/numerics.md "Float fallback"): its float ONNX nodes, reading the float tensors
        (and float constants) among its arguments; an op whose result the file's static shapes alone determine is a
        constant."""
        inputs: dict[fx.Node, Any] = {}
        for arg in node.all_input_nodes:
            value = self.env[arg]
            if isinstance(value, (FloatTensor, FloatConstant)):
                inputs[arg] = self._float_name(value)
            elif isinstance(value, tuple) and any(isinstance(v, FloatTensor) for v in value):
                inputs[arg] = tuple(v.name if isinstance(v, FloatTensor) else None for v in value)
        module = self.modules[node.target] if node.op == "call_module" else None
        output = emit_float_op(self, node, module, inputs, self.values, self.path(node), node.meta[FLOAT_REASON_KEY])
        folded = next((i for i in self.initializers if i.name == output), None)
        if folded is not None:  # computed from shapes alone (``torch.zeros_like(x)``): a constant of the file
            self.initializers.remove(folded)
            return FloatConstant(node)
        return FloatTensor(output) if isinstance(output, str) else tuple(None if o is None else FloatTensor(o) for o in output)

    def _float_name(self, value: FloatTensor | FloatConstant) -> str:
        """The ONNX name of a float tensor; a constant's float values become an initializer the first time."""
        if isinstance(value, FloatTensor):
            return value.name
        name = value.node.name
        if name not in self.float_constants:
            self.float_constants.add(self.initializer(name, self.values[value.node].detach().numpy()))
        return name

    def finish(self, node: fx.Node, float_name: str, quant: TensorQuant, clamp: tuple[int, int] | None) -> Any:
        path = self.path(node)
        if quant.dtype == "int32":
            return Int32Result(float_name, quant)
        if clamp is None or clamp == (-128, 127):
            return self.quantize(float_name, path, quant)
        return self.clamped(path, self.quantize(float_name, f"{path}.preact", quant), clamp)

    def clamped(self, path: str, value: QTensor, clamp: tuple[int, int]) -> QTensor:
        """A ReLU/ReLU6 as DequantizeLinear -> Relu/Clip -> QuantizeLinear at the same scale.

        For a fused activation ``value`` is the op's saturated pre-activation (``P.preact.q``): clamping after
        saturation is what requantization with a clamp computes, every op keeps its standard QDQ unit, and ONNX
        Runtime runs the op itself in integers.
        """
        scale = value.quant.scale
        source = self.dequantize(value)
        if clamp == (0, 127):
            out = self.node("Relu", [source], f"{path}.relu", f"{path}/Relu")
        else:
            low = self.initializer(f"{path}.clip.min", np.array(clamp[0] * scale, dtype=np.float32))
            high = self.initializer(f"{path}.clip.max", np.array(clamp[1] * scale, dtype=np.float32))
            out = self.node("Clip", [source, low, high], f"{path}.clip", f"{path}/Clip")
        return self.quantize(out, path, value.quant)

    def float_output_name(self, node: fx.Node, op: _WeightedOp) -> str:
        users = list(node.users)
        if op.output.dtype == "int32" and len(users) == 1 and users[0] in self.output_names:
            return self.output_names[users[0]]
        return f"{self.path(node)}.out"

    def weights(self, path: str, op: _WeightedOp, transposed: bool = False) -> tuple[str, str]:
        """The dequantized weight and bias; a bias beyond int32 as its int32 integers at ``s_in * s_w[c] * 2**k``."""
        weight = op.weight.t().contiguous() if transposed else op.weight
        weight_name = self._constant_dequantized(f"{path}.weight_q", weight, op.weight_scales, axis=1 if transposed else 0)
        exponents = bias_exponents(op.bias)
        scales = [float32(s * 2.0**k) for s, k in zip(bias_scales(op.input_scale, op.weight_scales), exponents.tolist(), strict=True)]
        values = torch.from_numpy(op.bias.numpy() >> exponents).to(torch.int32)
        bias_name = self._constant_dequantized(f"{path}.bias_q", values, scales, axis=0)
        return weight_name, bias_name

    # ---- data movement ----------------------------------------------------------------------------------------
    def reshape(self, path: str, value: QTensor, shape: tuple[int, ...]) -> QTensor:
        target = self.initializer(f"{path}.shape", np.array(shape, dtype=np.int64))
        out = self.node("Reshape", [self.dequantize(value), target], f"{path}.out", f"{path}/Reshape")
        return self.quantize(out, path, value.quant)

    def move(self, node: fx.Node, args: list[Any]) -> Any:
        """A node that only moves int8 values (an op with ``movement=True``, or an alias), written from its fx node:
        the values dequantized, moved, and quantized again at the same scale."""
        kind = source_op(node, self.modules)
        source = args[0]
        path = self.path(node)
        if kind is PreFusionOp.ALIAS:
            return source
        if kind is Op.SLICE and isinstance(source, tuple):
            return source[args[1]]
        output = self.values[node]
        if kind is Op.RESHAPE:
            return self.reshape(path, source, tuple(output.shape))
        rank = self.values[node.args[0]].dim()
        if kind is Op.TRANSPOSE:
            out = self.node("Transpose", [self.dequantize(source)], f"{path}.out", f"{path}/Transpose", perm=permutation(node, rank))
            return self.quantize(out, path, source.quant)
        if kind is Op.PAD:
            widths = padding(node, self.modules).widths(rank)
            pads = self.initializer(f"{path}.pads", np.array([w[0] for w in widths] + [w[1] for w in widths], dtype=np.int64))
            out = self.node("Pad", [self.dequantize(source), pads], f"{path}.out", f"{path}/Pad", mode="constant")
            return self.quantize(out, path, source.quant)
        if kind is Op.SPLIT:
            return self._split(path, source, split_axis(node, rank), [tuple(t.shape) for t in output], rank)
        if node.target in (torch.roll, "roll"):
            return self._roll(node, path, source, rank, tuple(output.shape))
        return self._slice(node, path, source, slice_index(node, args[1] if len(args) > 1 else None), rank, tuple(output.shape))

    def _roll(self, node: fx.Node, path: str, source: QTensor, rank: int, shape: tuple[int, ...]) -> QTensor:
        """``torch.roll`` along given axes: per axis, the last ``shift`` values Sliced off and Concatenated before
        the rest (a copy: the same scale); a roll of the flattened tensor (no ``dims``) is that roll along axis 0 of
        the tensor Reshaped to one axis, Reshaped back."""
        flattened = is_flattened_roll(node)
        rolled_shape = (math.prod(shape),) if flattened else shape
        rolled, rolled_rank = (self.reshape(f"{path}.flat", source, rolled_shape) if flattened else source), len(rolled_shape)
        for step, (axis, shift) in enumerate(roll_shifts(node, rank)):
            size = rolled_shape[axis]
            shift %= size
            if shift == 0:
                continue
            stem, before, after = f"{path}.{step}", (slice(None),) * axis, rolled_shape[axis + 1 :]
            tail_shape, head_shape = (*rolled_shape[:axis], shift, *after), (*rolled_shape[:axis], size - shift, *after)
            tail = self._slice(node, f"{stem}.tail", rolled, (*before, slice(size - shift, None)), rolled_rank, tail_shape)
            head = self._slice(node, f"{stem}.head", rolled, (*before, slice(0, size - shift)), rolled_rank, head_shape)
            out = self.node("Concat", [self.dequantize(tail), self.dequantize(head)], f"{stem}.out", f"{stem}/Concat", axis=axis)
            rolled = self.quantize(out, stem, source.quant)
        return self.reshape(path, rolled, shape) if flattened else rolled

    def _split(self, path: str, source: QTensor, axis: int, shapes: list[tuple[int, ...]], rank: int) -> tuple[QTensor, ...]:
        """ONNX Split into parts of ``shapes``; parts without the axis (``unbind``'s) reshaped after it."""
        unbound = len(shapes[0]) < rank
        sizes = self.initializer(f"{path}.split", np.array([1 if unbound else s[axis] for s in shapes], dtype=np.int64))
        names = [f"{path}.out{i}" for i in range(len(shapes))]
        self.nodes.append(helper.make_node("Split", [self.dequantize(source), sizes], names, name=f"{path}/Split", axis=axis))
        parts = tuple(self.quantize(name, f"{path}.{i}", source.quant) for i, name in enumerate(names))
        return tuple(self.reshape(f"{path}.{i}.unbound", p, s) for i, (p, s) in enumerate(zip(parts, shapes))) if unbound else parts

    def _slice(self, node: fx.Node, path: str, source: QTensor, index: Any, rank: int, shape: tuple[int, ...]) -> QTensor:
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
        names = [self.initializer(f"{path}.{part}", a) for part, a in zip(("starts", "ends", "axes", "steps"), arrays)]
        stem = path if len(shape) == rank else f"{path}.slice"
        out = self.node("Slice", [self.dequantize(source), *names], f"{stem}.out", f"{path}/Slice")
        if len(shape) == rank:
            return self.quantize(out, path, source.quant)
        return self.reshape(path, self.quantize(out, stem, source.quant), shape)


def _axis(quant: TensorQuant) -> dict[str, int]:
    return {} if quant.axis is None else {"axis": quant.axis}


def value_info(name: str, value: torch.Tensor) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape))
