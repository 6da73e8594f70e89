"""Ops left in float (the float fallback) as standard float ONNX nodes, opset 13.

An op that ``prepare_qat_fx`` leaves in float (no integer form, or a module whose qconfig is ``None``) sits in the
QDQ file between the DequantizeLinear of its integer inputs and the QuantizeLinear of its result. Each spelling
the fallback can export is one function here, found by the module class, function or method name of the fx node;
LayerNormalization and Gelu arrived after opset 13, so they are written as the arithmetic that defines them.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from edgeq.errors import ExportError
from edgeq.quantization.graph import VALUE_KEY
from edgeq.quantization.patterns import argument

FLOAT_FALLBACK_DOC = "float fallback: "
"""Start of the ``doc_string`` of every float node written here; the rest names the op and the reason."""


class FloatGraph(Protocol):
    """Where float nodes go: the QDQ builder's node list and initializers."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


FloatForm = Callable[["_Writer", fx.Node, "nn.Module | None", list[str]], str]

_FLOAT_FORMS: dict[Any, FloatForm] = {}
"""The float ONNX form of each spelling the float fallback exports (module class, function, or method name)."""


def _float_form(*spellings: Any) -> Callable[[FloatForm], FloatForm]:
    def register(form: FloatForm) -> FloatForm:
        _FLOAT_FORMS.update(dict.fromkeys(spellings, form))
        return form

    return register


def _spelling(node: fx.Node, module: nn.Module | None) -> Any:
    if module is not None:
        return type(module)
    return node.target


def emit_float_op(
    graph: FloatGraph,
    node: fx.Node,
    module: nn.Module | None,
    inputs: list[str],
    shape: tuple[int, ...],
    path: str,
    reason: str,
) -> str:
    """Append the float ONNX nodes of ``node`` to ``graph`` and return the name of their result.

    Args:
        inputs: the float ONNX names of ``node``'s tensor inputs, in order.
        shape: the shape of ``node``'s result (static: fixed at prepare).
        path: the stem of every name written (``P/<OpType>_<i>`` nodes, ``P.out`` result).
        reason: why the op is float; written as each node's ``doc_string`` (``check`` reports it).

    Raises:
        ExportError: the op has no float ONNX form here (the message names the node and the op).
    """
    form = _FLOAT_FORMS.get(_spelling(node, module))
    what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
    if form is None:
        raise ExportError(
            f"{what} '{path}': left in float ({reason}), but edgeq has no float ONNX form of it "
            f"(float ops it exports: {', '.join(sorted(_names()))}); move it after a DeQuantStub"
        )
    first = len(graph.nodes)
    output = form(_Writer(graph, path, shape), node, module, inputs)
    for onnx_node in graph.nodes[first:]:
        onnx_node.doc_string = f"{FLOAT_FALLBACK_DOC}{what} '{path}': {reason}"
    return output


def _names() -> set[str]:
    return {s.__name__ if hasattr(s, "__name__") else str(s) for s in _FLOAT_FORMS}


class _Writer:
    """Node and initializer helpers with names under one path; ``shape`` is the shape of the op's result."""

    def __init__(self, graph: FloatGraph, path: str, shape: tuple[int, ...]) -> None:
        self.graph = graph
        self.path = path
        self.shape = shape
        self.count = 0

    def node(self, op_type: str, inputs: list[str], final: bool = False, **attributes: Any) -> str:
        self.count += 1
        output = f"{self.path}.out" if final else f"{self.path}.{op_type.lower()}{self.count}"
        self.graph.nodes.append(
            helper.make_node(op_type, inputs, [output], name=f"{self.path}/{op_type}_{self.count}", **attributes)
        )
        return output

    def constant(self, name: str, value: np.ndarray | torch.Tensor | float, dtype: type = np.float32) -> str:
        array = value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=dtype)
        full = f"{self.path}.{name}"
        self.graph.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), full))
        return full


@_float_form(nn.LayerNorm, F.layer_norm)
def _layer_norm(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the normalized (last) axes, as torch computes it; the
    functional form's weight and bias are its tensor inputs after ``x`` (parameters: float initializers)."""
    if module is not None:
        shape, eps = module.normalized_shape, module.eps
        weight = None if module.weight is None else writer.constant("weight", module.weight)
        bias = None if module.bias is None else writer.constant("bias", module.bias)
    else:
        shape, eps = argument(node, 1, "normalized_shape"), argument(node, 4, "eps", 1e-5)
        given = iter(inputs[1:])
        weight, bias = (None if argument(node, i, name, None) is None else next(given) for i, name in ((2, "weight"), (3, "bias")))
    axes = list(range(-len(tuple(shape)), 0))
    mean = writer.node("ReduceMean", [inputs[0]], axes=axes, keepdims=1)
    centred = writer.node("Sub", [inputs[0], mean])
    variance = writer.node("ReduceMean", [writer.node("Mul", [centred, centred])], axes=axes, keepdims=1)
    deviation = writer.node("Sqrt", [writer.node("Add", [variance, writer.constant("eps", eps)])])
    last = weight is None and bias is None
    out = writer.node("Div", [centred, deviation], final=last)
    if weight is not None:
        out = writer.node("Mul", [out, weight], final=bias is None)
    if bias is not None:
        out = writer.node("Add", [out, bias], final=True)
    return out


@_float_form(nn.Softmax, F.softmax, torch.softmax, "softmax")
def _softmax(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    dim = module.dim if module is not None else argument(node, 1, "dim")
    if dim is None:
        raise ExportError(f"softmax '{node.name}': give dim explicitly")
    return writer.node("Softmax", [inputs[0]], final=True, axis=int(dim))


@_float_form(nn.GELU, F.gelu)
def _gelu(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    """``x * Φ(x)``: with ``Erf`` (``approximate='none'``) or the tanh approximation, as torch computes it."""
    approximate = module.approximate if module is not None else argument(node, 1, "approximate", "none")
    x = inputs[0]
    if approximate == "tanh":
        cube = writer.node("Mul", [writer.node("Mul", [x, x]), x])
        inner = writer.node("Add", [x, writer.node("Mul", [cube, writer.constant("c", 0.044715)])])
        phi = writer.node("Tanh", [writer.node("Mul", [inner, writer.constant("k", math.sqrt(2 / math.pi))])])
    else:
        phi = writer.node("Erf", [writer.node("Div", [x, writer.constant("sqrt2", math.sqrt(2))])])
    half = writer.node("Mul", [writer.node("Add", [phi, writer.constant("one", 1.0)]), writer.constant("half", 0.5)])
    return writer.node("Mul", [x, half], final=True)


@_float_form(nn.Linear)
def _linear(writer: _Writer, node: fx.Node, module: nn.Linear, inputs: list[str]) -> str:
    weight = writer.constant("weight", module.weight.t())
    if module.bias is None:
        return writer.node("MatMul", [inputs[0], weight], final=True)
    return writer.node("Add", [writer.node("MatMul", [inputs[0], weight]), writer.constant("bias", module.bias)], final=True)


@_float_form(nn.MultiheadAttention)
def _multihead_attention(writer: _Writer, node: fx.Node, module: nn.MultiheadAttention, inputs: list[str]) -> str:
    """Attention without masks as torch computes it: the input projections, ``softmax(q k^T / sqrt(d)) v`` per head,
    the output projection. It writes the attention output (the tuple's item 0), not the averaged weights."""
    path = f"MultiheadAttention '{writer.path}'"
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise ExportError(f"{path}: float export needs equal query, key and value sizes, no bias_k/v, no add_zero_attn")
    if any(argument(node, i, name, None) is not None for i, name in ((3, "key_padding_mask"), (5, "attn_mask"))) or argument(node, 7, "is_causal", False):
        raise ExportError(f"{path}: float export of attention with a mask is not supported; call it without masks")
    embed, heads = module.embed_dim, module.num_heads
    by_head = writer.constant("by_head", [0, 0, heads, embed // heads], np.int64)
    batch_first = [1, 0, 2]
    # (sequence, batch, embedding) inputs to batch first, each distinct one once (self-attention reads x three times)
    moved = {x: x if module.batch_first else writer.node("Transpose", [x], perm=batch_first) for x in dict.fromkeys(inputs[:3])}

    def project(x: str, index: int, name: str, perm: list[int]) -> str:
        rows = slice(index * embed, (index + 1) * embed)
        out = writer.node("MatMul", [moved[x], writer.constant(f"{name}_weight", module.in_proj_weight[rows].t())])
        if module.in_proj_bias is not None:
            out = writer.node("Add", [out, writer.constant(f"{name}_bias", module.in_proj_bias[rows])])
        return writer.node("Transpose", [writer.node("Reshape", [out, by_head])], perm=perm)

    query, key, value = inputs[:3]
    q, k, v = project(query, 0, "q", [0, 2, 1, 3]), project(key, 1, "k", [0, 2, 3, 1]), project(value, 2, "v", [0, 2, 1, 3])
    scores = writer.node("Mul", [writer.node("MatMul", [q, k]), writer.constant("scale", (embed // heads) ** -0.5)])
    mixed = writer.node("MatMul", [writer.node("Softmax", [scores], axis=-1), v])
    merged = writer.node("Reshape", [writer.node("Transpose", [mixed], perm=[0, 2, 1, 3]), writer.constant("merged", [0, 0, embed], np.int64)])
    out = writer.node("MatMul", [merged, writer.constant("out_weight", module.out_proj.weight.t())])
    last = module.batch_first
    if module.out_proj.bias is not None:
        out = writer.node("Add", [out, writer.constant("out_bias", module.out_proj.bias)], final=last)
    return out if last else writer.node("Transpose", [out], final=True, perm=batch_first)


@_float_form(operator.getitem)
def _item(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    """Item 0 of an op left in float that returns a tuple (attention's output): the one result its ONNX form has,
    so no node of its own."""
    if node.args[1] != 0:
        raise ExportError(f"'{node.name}': takes item {node.args[1]} of a float op's tuple; only item 0 (its output) is exported")
    return inputs[0]


@_float_form(nn.Conv2d)
def _conv2d(writer: _Writer, node: fx.Node, module: nn.Conv2d, inputs: list[str]) -> str:
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ExportError(f"Conv2d '{node.target}': float export needs explicit zero padding")
    operands = [inputs[0], writer.constant("weight", module.weight)]
    if module.bias is not None:
        operands.append(writer.constant("bias", module.bias))
    return writer.node(
        "Conv", operands, final=True, kernel_shape=list(module.kernel_size), strides=list(module.stride),
        pads=[*module.padding, *module.padding], dilations=list(module.dilation), group=module.groups,
    )


@_float_form(nn.ReLU, F.relu, torch.relu, "relu")
def _relu(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    return writer.node("Relu", [inputs[0]], final=True)


@_float_form(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def _matmul(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    return writer.node("MatMul", inputs, final=True)


_BINARY = {
    operator.add: "Add", torch.add: "Add", "add": "Add",
    operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub",
    operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul",
    operator.truediv: "Div", torch.div: "Div", "div": "Div",
}


def _number(operand: object) -> float | None:
    """The value of a number operand: a literal, or a node whose example value is a number (computed from static
    shapes); None for a tensor."""
    value = operand.meta.get(VALUE_KEY) if isinstance(operand, fx.Node) else operand
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@_float_form(*_BINARY)
def _binary(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    """Arithmetic of two float tensors, or of a float tensor and a number (a literal, or computed from static shapes
    such as ``x.shape[-1] ** -0.5``: its value for the model's input shapes)."""
    tensors = iter(inputs)
    numbers = [_number(arg) for arg in node.args[:2]]
    operands = [next(tensors) if number is None else writer.constant(f"operand{i}", number) for i, number in enumerate(numbers)]
    return writer.node(_BINARY[node.target], operands, final=True)


_RESIZE_MODES = {"nearest": "nearest", "bilinear": "linear"}
"""torch's interpolation modes that ONNX Resize computes the same way, and their Resize ``mode``."""


@_float_form(F.interpolate, nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d)
def _resize(writer: _Writer, node: fx.Node, module: nn.Module | None, inputs: list[str]) -> str:
    """``Resize`` with torch's coordinates: nearest takes ``floor(out * in / out_size)`` (``asymmetric``, ``floor``);
    bilinear is ``half_pixel`` (``align_corners`` when set; not ``pytorch_half_pixel``, which samples a size of 1 at
    0 where torch samples the middle). A ``scale_factor`` torch maps coordinates with goes in as ``scales``;
    otherwise the result's size as ``sizes``."""
    if module is not None:
        mode, align_corners = module.mode, module.align_corners
        scale_factor, recompute = module.scale_factor, module.recompute_scale_factor
    else:
        mode, align_corners = argument(node, 3, "mode", "nearest"), argument(node, 4, "align_corners")
        scale_factor, recompute = argument(node, 2, "scale_factor"), argument(node, 5, "recompute_scale_factor")
    if mode not in _RESIZE_MODES:
        raise ExportError(
            f"interpolate '{node.name}': mode '{mode}' has no float ONNX form (allowed: {', '.join(_RESIZE_MODES)})"
        )
    if mode == "nearest":
        coordinates = {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    else:
        coordinates = {"coordinate_transformation_mode": "align_corners" if align_corners else "half_pixel"}
    if scale_factor is not None and not recompute:
        factors = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * (len(writer.shape) - 2)
        sizing = [writer.constant("scales", [1.0, 1.0, *map(float, factors)])]
    else:
        sizing = ["", writer.constant("sizes", writer.shape, dtype=np.int64)]
    return writer.node("Resize", [inputs[0], "", *sizing], final=True, mode=_RESIZE_MODES[mode], **coordinates)
