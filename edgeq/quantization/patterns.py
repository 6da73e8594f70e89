"""Recognising the user's ops: one vocabulary for module calls, functional calls and tensor methods.

:func:`op_kind` maps every fx node to an :class:`OpKind` (``nn.ReLU``, ``F.relu``, ``torch.relu`` and
``x.relu()`` are all ``RELU``), and :func:`argument` reads an argument the same way whether it was passed by
position or by keyword. Adding an op to edgeq starts by adding its spellings here.
"""

from __future__ import annotations

import operator
from enum import Enum
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgeq.ops import Op
from edgeq.quantization.stubs import is_dequant_stub, is_quant_stub


class OpKind(str, Enum):
    """What a node does, whatever its spelling."""

    QUANT_STUB = "quant_stub"
    DEQUANT_STUB = "dequant_stub"
    CONV2D = "conv2d"
    LINEAR = "linear"
    BATCHNORM2D = "batchnorm2d"
    RELU = "relu"
    RELU6 = "relu6"
    ADD = "add"
    CAT = "cat"
    MAXPOOL2D = "maxpool2d"
    AVGPOOL2D = "avgpool2d"
    ADAPTIVE_AVGPOOL2D = "adaptive_avgpool2d"
    MEAN = "mean"
    UPSAMPLE = "upsample"
    TABLE_ACTIVATION = "table_activation"
    """An activation computed as a lookup table; :func:`table_op` says which (``Op.SIGMOID``...)."""
    MUL = "mul"
    """Product of two tensors (broadcasting); ``x * sigmoid(x)`` and ``x * hardsigmoid(x)`` fuse into SiLU and
    Hardswish."""
    MATMUL = "matmul"
    """Matrix product of two tensors (``q @ k.transpose(-2, -1)``, ``torch.bmm``)."""
    RESHAPE = "reshape"
    """Moves or views integer values without arithmetic (view, flatten, transpose, chunk, getitem...)."""
    DROPOUT = "dropout"
    """Active in QAT training, removed by convert."""
    UNSUPPORTED = "unsupported"


_MODULE_KINDS: dict[type[nn.Module], OpKind | Op] = {
    nn.Conv2d: OpKind.CONV2D,
    nn.Linear: OpKind.LINEAR,
    nn.BatchNorm2d: OpKind.BATCHNORM2D,
    nn.ReLU: OpKind.RELU,
    nn.ReLU6: OpKind.RELU6,
    nn.MaxPool2d: OpKind.MAXPOOL2D,
    nn.AvgPool2d: OpKind.AVGPOOL2D,
    nn.AdaptiveAvgPool2d: OpKind.ADAPTIVE_AVGPOOL2D,
    nn.Upsample: OpKind.UPSAMPLE,
    nn.UpsamplingNearest2d: OpKind.UPSAMPLE,
    nn.UpsamplingBilinear2d: OpKind.UPSAMPLE,
    nn.Sigmoid: Op.SIGMOID,
    nn.Tanh: Op.TANH,
    nn.Hardsigmoid: Op.HARDSIGMOID,
    nn.Hardswish: Op.HARDSWISH,
    nn.SiLU: Op.SILU,
    nn.LeakyReLU: Op.LEAKYRELU,
    nn.GELU: Op.GELU,
    nn.Flatten: OpKind.RESHAPE,
    nn.Unflatten: OpKind.RESHAPE,
    nn.Identity: OpKind.RESHAPE,
    nn.Dropout: OpKind.DROPOUT,
    nn.Dropout2d: OpKind.DROPOUT,
}

_FUNCTION_KINDS: dict[Any, OpKind | Op] = {
    F.relu: OpKind.RELU,
    torch.relu: OpKind.RELU,
    torch.relu_: OpKind.RELU,
    F.relu6: OpKind.RELU6,
    operator.add: OpKind.ADD,
    operator.iadd: OpKind.ADD,
    torch.add: OpKind.ADD,
    torch.cat: OpKind.CAT,
    torch.concat: OpKind.CAT,
    torch.concatenate: OpKind.CAT,
    F.max_pool2d: OpKind.MAXPOOL2D,
    F.avg_pool2d: OpKind.AVGPOOL2D,
    F.adaptive_avg_pool2d: OpKind.ADAPTIVE_AVGPOOL2D,
    F.batch_norm: OpKind.BATCHNORM2D,
    torch.mean: OpKind.MEAN,
    F.interpolate: OpKind.UPSAMPLE,
    torch.sigmoid: Op.SIGMOID,
    F.sigmoid: Op.SIGMOID,
    torch.tanh: Op.TANH,
    F.tanh: Op.TANH,
    F.hardsigmoid: Op.HARDSIGMOID,
    F.hardswish: Op.HARDSWISH,
    F.silu: Op.SILU,
    F.leaky_relu: Op.LEAKYRELU,
    F.gelu: Op.GELU,
    operator.mul: OpKind.MUL,
    torch.mul: OpKind.MUL,
    operator.matmul: OpKind.MATMUL,
    torch.matmul: OpKind.MATMUL,
    torch.bmm: OpKind.MATMUL,
    torch.flatten: OpKind.RESHAPE,
    torch.reshape: OpKind.RESHAPE,
    torch.transpose: OpKind.RESHAPE,
    torch.permute: OpKind.RESHAPE,
    torch.squeeze: OpKind.RESHAPE,
    torch.unsqueeze: OpKind.RESHAPE,
    torch.chunk: OpKind.RESHAPE,
    torch.split: OpKind.RESHAPE,
    operator.getitem: OpKind.RESHAPE,
    F.dropout: OpKind.DROPOUT,
}

_FUNCTION_KINDS_BY_NAME: dict[str, OpKind | Op] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": OpKind.DROPOUT,
}
"""Functions of optional libraries, by qualified name (importing them here would make them dependencies)."""

_METHOD_KINDS: dict[str, OpKind | Op] = {
    "relu": OpKind.RELU,
    "relu_": OpKind.RELU,
    "add": OpKind.ADD,
    "add_": OpKind.ADD,
    "__add__": OpKind.ADD,
    "mean": OpKind.MEAN,
    "sigmoid": Op.SIGMOID,
    "tanh": Op.TANH,
    "mul": OpKind.MUL,
    "matmul": OpKind.MATMUL,
    "bmm": OpKind.MATMUL,
    "view": OpKind.RESHAPE,
    "reshape": OpKind.RESHAPE,
    "flatten": OpKind.RESHAPE,
    "transpose": OpKind.RESHAPE,
    "permute": OpKind.RESHAPE,
    "contiguous": OpKind.RESHAPE,
    "squeeze": OpKind.RESHAPE,
    "unsqueeze": OpKind.RESHAPE,
    "chunk": OpKind.RESHAPE,
    "split": OpKind.RESHAPE,
    "__getitem__": OpKind.RESHAPE,
}

SUPPORTED_OPS = (
    "Conv2d (+BatchNorm2d, +ReLU/ReLU6), BatchNorm2d / F.batch_norm anywhere (+ReLU/ReLU6), Linear (+ReLU/ReLU6), add (+ReLU/ReLU6), cat, ReLU, ReLU6, "
    "max_pool2d, avg_pool2d, adaptive_avg_pool2d, mean over H and W, nearest upsample by integer factors, "
    "bilinear resize (F.interpolate, nn.Upsample, nn.UpsamplingBilinear2d; align_corners either way; no antialias), "
    "Sigmoid, Tanh, Hardsigmoid, Hardswish, SiLU (also x * sigmoid(x)), LeakyReLU, GELU (approximate 'none' or 'tanh'), "
    "product of two tensors, matrix product of two tensors (matmul, @, bmm), "
    "flatten / view / reshape / transpose / permute / chunk / split / getitem, dropout, stochastic depth"
)


def _spelled(node: fx.Node, modules: dict[str, nn.Module]) -> OpKind | Op:
    """What the spelling tables say of a node: an :class:`OpKind`, or the table-activation :class:`Op` itself."""
    if node.op == "call_module":
        module = modules[node.target]
        if is_quant_stub(module):
            return OpKind.QUANT_STUB
        if is_dequant_stub(module):
            return OpKind.DEQUANT_STUB
        if isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0):
            return OpKind.RELU6
        return _MODULE_KINDS.get(type(module), OpKind.UNSUPPORTED)
    if node.op == "call_function":
        if node.target is F.hardtanh and (argument(node, 1, "min_val", -1.0), argument(node, 2, "max_val", 1.0)) == (
            0.0,
            6.0,
        ):
            return OpKind.RELU6
        if node.target in _FUNCTION_KINDS:
            return _FUNCTION_KINDS[node.target]
        name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', '')}"
        return _FUNCTION_KINDS_BY_NAME.get(name, OpKind.UNSUPPORTED)
    if node.op == "call_method":
        return _METHOD_KINDS.get(str(node.target), OpKind.UNSUPPORTED)
    return OpKind.UNSUPPORTED


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> OpKind:
    """The :class:`OpKind` of an fx node (``UNSUPPORTED`` when edgeq has no integer implementation)."""
    kind = _spelled(node, modules)
    return OpKind.TABLE_ACTIVATION if isinstance(kind, Op) else kind


def table_op(node: fx.Node, modules: dict[str, nn.Module]) -> Op:
    """The lookup-table op of a ``TABLE_ACTIVATION`` node (``nn.SiLU`` and ``F.silu`` are ``Op.SILU``; a GELU with
    ``approximate='tanh'`` is ``Op.GELU_TANH``)."""
    kind = _spelled(node, modules)
    assert isinstance(kind, Op), f"{node.name} is not a table activation"
    if kind is Op.GELU and _gelu_approximation(node, modules) == "tanh":
        return Op.GELU_TANH
    return kind


def _gelu_approximation(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The ``approximate`` of an ``nn.GELU`` / ``F.gelu`` node: ``'none'`` (the erf form) or ``'tanh'``, the only
    values torch runs (it refuses any other while prepare runs the example inputs, naming the node)."""
    if node.op == "call_module":
        return modules[node.target].approximate
    return argument(node, 1, "approximate", "none")


def argument(node: fx.Node, position: int, name: str, default: Any = None) -> Any:
    """An argument of a call node, passed by keyword or at ``position`` (0 is the first tensor)."""
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > position:
        return node.args[position]
    return default


def pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(2, 3) -> (2, 3)``."""
    if isinstance(value, int):
        return (value, value)
    if len(value) == 1:
        return (int(value[0]), int(value[0]))
    return (int(value[0]), int(value[1]))


class Movement(str, Enum):
    """What a RESHAPE-kind node does to its values (export and the compiler need the detail)."""

    ALIAS = "alias"
    """No change at all (``contiguous``, ``nn.Identity``)."""
    RESHAPE = "reshape"
    """Same values in row-major order, another shape (view, reshape, flatten, squeeze, unsqueeze)."""
    TRANSPOSE = "transpose"
    """A permutation of the axes (transpose, permute)."""
    SPLIT = "split"
    """Several outputs along one axis (chunk, split)."""
    GETITEM = "getitem"
    """One output of a split, or a slice of a tensor."""


_MOVEMENTS: dict[Any, Movement] = {
    nn.Identity: Movement.ALIAS,
    "contiguous": Movement.ALIAS,
    nn.Flatten: Movement.RESHAPE,
    nn.Unflatten: Movement.RESHAPE,
    torch.flatten: Movement.RESHAPE,
    torch.reshape: Movement.RESHAPE,
    torch.squeeze: Movement.RESHAPE,
    torch.unsqueeze: Movement.RESHAPE,
    "view": Movement.RESHAPE,
    "reshape": Movement.RESHAPE,
    "flatten": Movement.RESHAPE,
    "squeeze": Movement.RESHAPE,
    "unsqueeze": Movement.RESHAPE,
    torch.transpose: Movement.TRANSPOSE,
    torch.permute: Movement.TRANSPOSE,
    "transpose": Movement.TRANSPOSE,
    "permute": Movement.TRANSPOSE,
    torch.chunk: Movement.SPLIT,
    torch.split: Movement.SPLIT,
    "chunk": Movement.SPLIT,
    "split": Movement.SPLIT,
    operator.getitem: Movement.GETITEM,
    "__getitem__": Movement.GETITEM,
}


MOVEMENT_OPS: dict[Movement, Op | None] = {
    Movement.ALIAS: None,
    Movement.RESHAPE: Op.RESHAPE,
    Movement.TRANSPOSE: Op.TRANSPOSE,
    Movement.SPLIT: Op.SPLIT,
    Movement.GETITEM: Op.SLICE,
}
"""The op each movement is (an alias is no op at all: its output is its input)."""


def movement(node: fx.Node, modules: dict[str, nn.Module]) -> Movement:
    """The :class:`Movement` of a RESHAPE-kind node."""
    key = type(modules[node.target]) if node.op == "call_module" else node.target
    return _MOVEMENTS[key]


def permutation(node: fx.Node, rank: int) -> list[int]:
    """The axis permutation of a TRANSPOSE node (transpose swaps two axes, permute lists them all)."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "transpose":
        first, second = argument(node, 1, "dim0") % rank, argument(node, 2, "dim1") % rank
        order = list(range(rank))
        order[first], order[second] = second, first
        return order
    dims = node.args[1:] if node.op == "call_method" else argument(node, 1, "dims")
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return [d % rank for d in dims]


def split_axis(node: fx.Node, rank: int) -> int:
    """The axis a SPLIT node splits along."""
    return argument(node, 2, "dim", 0) % rank
