"""Recognising the user's ops: one vocabulary for module calls, functional calls and tensor methods.

:func:`source_op` names every fx node by the :class:`edgeq.ops.Op` it is after fusion (``nn.ReLU``, ``F.relu``,
``torch.relu`` and ``x.relu()`` are all ``Op.RELU``; ``F.interpolate`` is ``Op.UPSAMPLE_NEAREST2D`` or
``Op.UPSAMPLE_BILINEAR2D`` by its mode), or by a :class:`PreFusionOp` for what is no op of its own after fusion
(BatchNorm, ReLU6, the stubs, dropout, aliases); :func:`argument` reads an argument the same way whether it was
passed by position or by keyword. An op's spellings go here once its ``Op`` is declared in :mod:`edgeq.ops`
(docs/architecture.md, "Adding an op").
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgeq.ops import Op
from edgeq.quantization.stubs import is_dequant_stub, is_quant_stub


class PreFusionOp(Enum):
    """What the user writes that is no op of its own after fusion: prepare folds, fuses or drops it.

    These names live here, not in :mod:`edgeq.ops`: no layer after ``prepare_qat_fx`` (convert's integer ops, the QDQ
    file, check, targets, the compiler) ever sees them, and the registry's tables and target files list only ops.
    A plain enum (not a ``str``), so that no pre-fusion name ever compares equal to an op's.
    """

    QUANT_STUB = "quant_stub"
    """Becomes the region's ``QuantizeInput``."""
    DEQUANT_STUB = "dequant_stub"
    """Becomes the region's ``DequantizeOutput``."""
    BATCH_NORM = "batch_norm"
    """BatchNorm2d or BatchNorm1d: folded into the conv before it, or into the linear layer before it whose output
    is 2-D (N, C); else a conv2d of its own (a depthwise 1x1 conv of unit weights), a BatchNorm1d's (N, C) or
    (N, C, L) input viewed as (N, C, 1, 1) or (N, C, L, 1) around it."""
    RELU6 = "relu6"
    """Fused into the conv, linear or add before it, or a relu of its own (a clamp to [0, 6])."""
    HARDTANH = "hardtanh"
    """A clamp to constant bounds other than ReLU's and ReLU6's (``nn.Hardtanh``, ``F.hardtanh``, ``torch.clamp``,
    ``torch.clip``): a relu of its own (a clamp to its bounds), fused with nothing."""
    DROPOUT = "dropout"
    """Active in QAT training, removed by convert."""
    ALIAS = "alias"
    """No change at all (``contiguous``, ``nn.Identity``): its output is its input."""


SourceOp = Op | PreFusionOp
"""What a node of the user's graph is: an op after fusion, or what fusion consumes."""

_MODULE_OPS: dict[type[nn.Module], SourceOp] = {
    nn.Conv2d: Op.CONV2D,
    nn.Linear: Op.LINEAR,
    nn.BatchNorm1d: PreFusionOp.BATCH_NORM,
    nn.BatchNorm2d: PreFusionOp.BATCH_NORM,
    nn.SyncBatchNorm: PreFusionOp.BATCH_NORM,  # what torch's convert_sync_batchnorm makes of a BatchNorm1d / 2d
    nn.ReLU: Op.RELU,
    nn.ReLU6: PreFusionOp.RELU6,
    nn.Hardtanh: PreFusionOp.HARDTANH,
    nn.MaxPool2d: Op.MAX_POOL2D,
    nn.AvgPool2d: Op.AVG_POOL2D,
    nn.AdaptiveAvgPool2d: Op.AVG_POOL2D,
    nn.Upsample: Op.UPSAMPLE_NEAREST2D,
    nn.UpsamplingNearest2d: Op.UPSAMPLE_NEAREST2D,
    nn.UpsamplingBilinear2d: Op.UPSAMPLE_BILINEAR2D,
    nn.Sigmoid: Op.SIGMOID,
    nn.Tanh: Op.TANH,
    nn.Hardsigmoid: Op.HARDSIGMOID,
    nn.Hardswish: Op.HARDSWISH,
    nn.SiLU: Op.SILU,
    nn.LeakyReLU: Op.LEAKYRELU,
    nn.GELU: Op.GELU,
    nn.ELU: Op.ELU,
    nn.ZeroPad2d: Op.PAD,
    nn.ConstantPad2d: Op.PAD,
    nn.Flatten: Op.RESHAPE,
    nn.Unflatten: Op.RESHAPE,
    nn.Identity: PreFusionOp.ALIAS,
    nn.Dropout: PreFusionOp.DROPOUT,
    nn.Dropout2d: PreFusionOp.DROPOUT,
}

_FUNCTION_OPS: dict[Any, SourceOp] = {
    F.conv2d: Op.CONV2D,
    F.linear: Op.LINEAR,
    F.relu: Op.RELU,
    torch.relu: Op.RELU,
    torch.relu_: Op.RELU,
    F.relu6: PreFusionOp.RELU6,
    F.hardtanh: PreFusionOp.HARDTANH,
    torch.clamp: PreFusionOp.HARDTANH,
    torch.clip: PreFusionOp.HARDTANH,
    operator.add: Op.ADD,
    operator.iadd: Op.ADD,
    torch.add: Op.ADD,
    torch.cat: Op.CONCAT,
    torch.concat: Op.CONCAT,
    torch.concatenate: Op.CONCAT,
    F.max_pool2d: Op.MAX_POOL2D,
    F.avg_pool2d: Op.AVG_POOL2D,
    F.adaptive_avg_pool2d: Op.AVG_POOL2D,
    F.batch_norm: PreFusionOp.BATCH_NORM,
    torch.mean: Op.GLOBAL_AVG_POOL2D,
    F.interpolate: Op.UPSAMPLE_NEAREST2D,
    torch.sigmoid: Op.SIGMOID,
    F.sigmoid: Op.SIGMOID,
    torch.tanh: Op.TANH,
    F.tanh: Op.TANH,
    F.hardsigmoid: Op.HARDSIGMOID,
    F.hardswish: Op.HARDSWISH,
    F.silu: Op.SILU,
    F.leaky_relu: Op.LEAKYRELU,
    F.gelu: Op.GELU,
    F.elu: Op.ELU,
    operator.mul: Op.MUL,
    torch.mul: Op.MUL,
    operator.matmul: Op.MATMUL,
    torch.matmul: Op.MATMUL,
    torch.bmm: Op.MATMUL,
    torch.flatten: Op.RESHAPE,
    torch.reshape: Op.RESHAPE,
    torch.transpose: Op.TRANSPOSE,
    torch.permute: Op.TRANSPOSE,
    torch.squeeze: Op.RESHAPE,
    torch.unsqueeze: Op.RESHAPE,
    torch.chunk: Op.SPLIT,
    torch.split: Op.SPLIT,
    torch.unbind: Op.SPLIT,
    operator.getitem: Op.SLICE,
    torch.narrow: Op.SLICE,
    torch.roll: Op.SLICE,
    F.pad: Op.PAD,
    F.dropout: PreFusionOp.DROPOUT,
}

_FUNCTION_OPS_BY_NAME: dict[str, SourceOp] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": PreFusionOp.DROPOUT,
}
"""Functions of optional libraries, by qualified name (importing them here would make them dependencies)."""

_METHOD_OPS: dict[str, SourceOp] = {
    "relu": Op.RELU,
    "relu_": Op.RELU,
    "clamp": PreFusionOp.HARDTANH,
    "clip": PreFusionOp.HARDTANH,
    "add": Op.ADD,
    "add_": Op.ADD,
    "__add__": Op.ADD,
    "mean": Op.GLOBAL_AVG_POOL2D,
    "sigmoid": Op.SIGMOID,
    "tanh": Op.TANH,
    "mul": Op.MUL,
    "matmul": Op.MATMUL,
    "bmm": Op.MATMUL,
    "view": Op.RESHAPE,
    "reshape": Op.RESHAPE,
    "flatten": Op.RESHAPE,
    "transpose": Op.TRANSPOSE,
    "permute": Op.TRANSPOSE,
    "contiguous": PreFusionOp.ALIAS,
    "squeeze": Op.RESHAPE,
    "unsqueeze": Op.RESHAPE,
    "chunk": Op.SPLIT,
    "split": Op.SPLIT,
    "unbind": Op.SPLIT,
    "__getitem__": Op.SLICE,
    "narrow": Op.SLICE,
    "roll": Op.SLICE,
}

SUPPORTED_OPS = (
    "Conv2d / F.conv2d (+BatchNorm2d, +ReLU/ReLU6), BatchNorm2d / BatchNorm1d / F.batch_norm anywhere (+ReLU/ReLU6), "
    "Linear / F.linear (+BatchNorm1d on a 2-D output, +ReLU/ReLU6), add (+ReLU/ReLU6), cat, ReLU, ReLU6, "
    "Hardtanh / clamp / clip of constant bounds, "
    "max_pool2d, avg_pool2d, adaptive_avg_pool2d, mean over H and W, nearest upsample by integer factors, "
    "bilinear resize (F.interpolate, nn.Upsample, nn.UpsamplingBilinear2d; align_corners either way; no antialias), "
    "Sigmoid, Tanh, Hardsigmoid, Hardswish, SiLU (also x * sigmoid(x)), LeakyReLU, ELU, GELU (approximate 'none' or 'tanh'), "
    "product of two tensors, matrix product of two tensors (matmul, @, bmm), "
    "flatten / view / reshape / transpose / permute / chunk / split / unbind / getitem / narrow / roll, "
    "F.pad / nn.ZeroPad2d / nn.ConstantPad2d with zeros, dropout, stochastic depth"
)


def _spelled(node: fx.Node, modules: dict[str, nn.Module]) -> SourceOp | None:
    """What the spelling tables say of a node (``None``: no spelling of an op edgeq has)."""
    if node.op == "call_module":
        module = modules[node.target]
        if is_quant_stub(module):
            return PreFusionOp.QUANT_STUB
        if is_dequant_stub(module):
            return PreFusionOp.DEQUANT_STUB
        return _MODULE_OPS.get(type(module))
    if node.op == "call_function":
        if node.target in _FUNCTION_OPS:
            return _FUNCTION_OPS[node.target]
        name = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__qualname__', '')}"
        return _FUNCTION_OPS_BY_NAME.get(name)
    if node.op == "call_method":
        return _METHOD_OPS.get(str(node.target))
    return None


_RESIZES = (Op.UPSAMPLE_NEAREST2D, Op.UPSAMPLE_BILINEAR2D)


def source_op(node: fx.Node, modules: dict[str, nn.Module]) -> SourceOp | None:
    """What an fx node is (``None`` when edgeq has no integer implementation of it), refined by its settings: a GELU
    with ``approximate='tanh'`` is ``Op.GELU_TANH``; a resize is ``Op.UPSAMPLE_BILINEAR2D`` in mode ``'bilinear'``,
    else ``Op.UPSAMPLE_NEAREST2D`` (whose emitter refuses modes other than ``'nearest'``, naming the mode)."""
    op = _spelled(node, modules)
    if op is PreFusionOp.HARDTANH:
        return _CLAMPS_OF_BOUNDS.get(clamp_bounds(node, modules), op)
    if op is Op.GELU and _gelu_approximation(node, modules) == "tanh":
        return Op.GELU_TANH
    if op in _RESIZES:
        return Op.UPSAMPLE_BILINEAR2D if interpolation(node, modules).mode == "bilinear" else Op.UPSAMPLE_NEAREST2D
    return op


_CLAMPS_OF_BOUNDS: dict[tuple[float, float], SourceOp] = {(0.0, math.inf): Op.RELU, (0.0, 6.0): PreFusionOp.RELU6}
"""The clamps that are a ReLU (``torch.clamp(x, min=0)``) or a ReLU6 (``nn.ReLU6`` is an ``nn.Hardtanh``): they fuse."""


def clamp_bounds(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Any, Any]:
    """The ``(low, high)`` of a Hardtanh or clamp node (``-inf`` / ``inf`` for a bound ``torch.clamp`` is not
    given; a tensor bound is its fx node)."""
    if node.op == "call_module":
        module = modules[node.target]
        return (module.min_val, module.max_val)
    if node.target is F.hardtanh:
        return (argument(node, 1, "min_val", -1.0), argument(node, 2, "max_val", 1.0))
    low, high = argument(node, 1, "min"), argument(node, 2, "max")
    return (-math.inf if low is None else low, math.inf if high is None else high)


def spelled_ops() -> set[SourceOp]:
    """Every op and pre-fusion op some spelling reads as (the refinements of :func:`source_op` included)."""
    spelled = {*_MODULE_OPS.values(), *_FUNCTION_OPS.values(), *_FUNCTION_OPS_BY_NAME.values(), *_METHOD_OPS.values()}
    return spelled | {PreFusionOp.QUANT_STUB, PreFusionOp.DEQUANT_STUB, Op.GELU_TANH, *_RESIZES}


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


def permutation(node: fx.Node, rank: int) -> list[int]:
    """The axis permutation of a ``Op.TRANSPOSE`` node (transpose swaps two axes, permute lists them all)."""
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


@dataclass(frozen=True)
class Padding:
    """The settings of an ``F.pad`` call or an ``nn.ZeroPad2d`` / ``nn.ConstantPad2d`` module."""

    pad: tuple[int, ...]
    """``F.pad``'s order: the last axis's (before, after), then the one before it..."""
    mode: str
    value: float

    def widths(self, rank: int) -> list[tuple[int, int]]:
        """The (before, after) of each of ``rank`` axes, first axis first."""
        pairs = [(self.pad[i], self.pad[i + 1]) for i in range(0, len(self.pad), 2)]
        return [(0, 0)] * (rank - len(pairs)) + pairs[::-1]


def padding(node: fx.Node, modules: dict[str, nn.Module]) -> Padding:
    """The padding of an ``Op.PAD`` node, whether a module or ``F.pad`` (positional or keyword)."""
    if node.op == "call_module":
        module = modules[node.target]
        return Padding(tuple(int(p) for p in module.padding), "constant", float(module.value))
    value = argument(node, 3, "value")
    return Padding(tuple(int(p) for p in argument(node, 1, "pad")), argument(node, 2, "mode", "constant"), float(value or 0.0))


def split_axis(node: fx.Node, rank: int) -> int:
    """The axis a ``Op.SPLIT`` node splits along (``unbind``'s is its second argument, ``chunk``'s and
    ``split``'s their third)."""
    return argument(node, 1 if _called(node) == "unbind" else 2, "dim", 0) % rank


def slice_index(node: fx.Node, index: Any) -> Any:
    """The ``tensor[...]`` index an ``Op.SLICE`` node reads: its own for ``getitem``; for ``narrow(dim, start,
    length)``, the slice ``start:start + length`` along ``dim``."""
    if _called(node) != "narrow":
        return index
    dim, start, length = argument(node, 1, "dim"), argument(node, 2, "start"), argument(node, 3, "length")
    along = slice(start, start + length)
    return (Ellipsis, along, *(slice(None),) * (-dim - 1)) if dim < 0 else (*(slice(None),) * dim, along)


def is_flattened_roll(node: fx.Node) -> bool:
    """Whether ``node`` is a ``torch.roll`` of the flattened tensor (no ``dims``): a roll along axis 0 of the
    tensor flattened, reshaped back."""
    return _called(node) == "roll" and argument(node, 2, "dims") in (None, [], ())


def roll_shifts(node: fx.Node, rank: int) -> list[tuple[int, int]] | None:
    """The (axis, shift) pairs of a ``torch.roll`` node (a roll of the flattened tensor: ``[(0, shift)]`` of the
    flattened tensor), ``None`` for a node that is no roll."""
    if _called(node) != "roll":
        return None
    shifts, dims = argument(node, 1, "shifts"), argument(node, 2, "dims")
    shifts = shifts if isinstance(shifts, (tuple, list)) else [shifts]
    if is_flattened_roll(node):
        return [(0, int(shifts[0]))]
    dims = dims if isinstance(dims, (tuple, list)) else [dims]
    return [(int(d) % rank, int(s)) for d, s in zip(dims, shifts)]


def _called(node: fx.Node) -> str:
    """The name of the function or method a call node calls."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


@dataclass(frozen=True)
class Interpolation:
    """The settings of an ``F.interpolate`` call or an ``nn.Upsample`` / ``nn.Upsampling*2d`` module."""

    mode: str
    align_corners: bool
    scale_factor: float | tuple[float, ...] | None
    recompute_scale_factor: bool
    antialias: bool


def interpolation(node: fx.Node, modules: dict[str, nn.Module]) -> Interpolation:
    """The interpolation settings of an upsample node, whether a module or ``F.interpolate`` (positional or keyword)."""
    if node.op == "call_module":
        module = modules[node.target]
        factor, recompute = module.scale_factor, module.recompute_scale_factor
        return Interpolation(module.mode, bool(module.align_corners), factor, bool(recompute), False)
    return Interpolation(
        argument(node, 3, "mode", "nearest"),
        bool(argument(node, 4, "align_corners", False)),
        argument(node, 2, "scale_factor"),
        bool(argument(node, 5, "recompute_scale_factor", False)),
        bool(argument(node, 6, "antialias", False)),
    )


def moves_values(op: SourceOp | None) -> bool:
    """Whether a node of ``op`` only moves or views values (a movement op, or an alias): no arithmetic, no scale of
    its own."""
    return op is PreFusionOp.ALIAS or (isinstance(op, Op) and op.info.movement)
