"""How ``prepare_qat_fx`` rewrites each op the user wrote into its canonical op (:mod:`.qat_modules`).

One emitter per op after fusion, registered against the op in :data:`CANONICAL_EMITTERS` (the registry test finds
a missing one), and one per pre-fusion op that becomes a canonical op of its own (:data:`PRE_FUSION_EMITTERS`: the
QuantStub, a BatchNorm or ReLU6 that nothing fused). An emitter reads the node's settings, refuses those edgeq
cannot run in integers with :meth:`Rewriter.unsupported` (the op then stays float), and adds the canonical op to the
prepared graph with the quantizer its output needs.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from fractions import Fraction

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgeq.errors import QuantizationError
from edgeq.numerics import RELU6_CEILING
from edgeq.ops import LOOKUP_TABLE_OPS, Op, OpTable, gated_op
from edgeq.quantization.batch_norms import batchnorm_as
from edgeq.quantization.fake_quantize import ActivationFakeQuantize
from edgeq.quantization.fusion import Fusion
from edgeq.quantization.graph import VALUE_KEY, TensorInfo, describe_node, getattr_path, makes_one_tensor, produces_tensor, tensor_info
from edgeq.quantization.patterns import PreFusionOp, SourceOp, argument, clamp_bounds, interpolation, padding, pair
from edgeq.quantization.qat_modules import (
    Activation,
    AddAct,
    AvgPool2d,
    Clamp,
    Concat,
    ConvAct2d,
    GlobalAvgPool2d,
    LinearAct,
    LookupTableActivation,
    MatMul,
    MaxPool2d,
    Multiply,
    QuantizeInput,
    UpsampleBilinear2d,
    UpsampleNearest2d,
)
from edgeq.quantization.rewriter import Rewriter
from edgeq.quantization.stubs import fixed_scale_of
from edgeq.quantization.target_constraints import check_fixed_scale

Emitter = Callable[[Rewriter, fx.Node], fx.Node]

CANONICAL_EMITTERS: OpTable[Emitter] = OpTable("canonical-op emitter in quantization/canonical_emitters.py")
"""How ``prepare_qat_fx`` rewrites each op into its canonical op; ops that only move values are kept as written."""

PRE_FUSION_EMITTERS: dict[PreFusionOp, Emitter] = {}
"""The canonical op of each pre-fusion op left on its own (the DeQuantStub, which ends the region, has none: the
driver writes its ``DequantizeOutput``)."""

MOVEMENT_OPS: tuple[Op, ...] = tuple(op for op in Op if op.info.movement)
"""The ops that only move values."""

def _pre_fusion(*ops: PreFusionOp) -> Callable[[Emitter], Emitter]:
    def register(emitter: Emitter) -> Emitter:
        PRE_FUSION_EMITTERS.update(dict.fromkeys(ops, emitter))
        return emitter

    return register


def emitter_of(op: SourceOp | None) -> Emitter | None:
    """The emitter of a node read as ``op`` (``None``: edgeq has no integer implementation of it)."""
    if isinstance(op, PreFusionOp):
        return PRE_FUSION_EMITTERS.get(op)
    return None if op is None else CANONICAL_EMITTERS.get(op)


@_pre_fusion(PreFusionOp.QUANT_STUB)
def _emit_quant_stub(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    path = str(node.target)
    fixed_scale = fixed_scale_of(rewriter.modules[path])
    check_fixed_scale(rewriter.target, path, fixed_scale)
    rewriter.qconfig(node, allows_int32=False)
    return rewriter.call(path, QuantizeInput(rewriter.quantizer(node, path, fixed_scale, quantizes_float=True)), node.args, node)


@CANONICAL_EMITTERS.register(Op.CONV2D)
def _emit_conv2d(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    conv = rewriter.modules[node.target] if node.op == "call_module" else _functional_conv2d(rewriter, node)
    fusion = rewriter.fusions[node]
    if conv.padding_mode != "zeros":
        raise rewriter.unsupported(node, f"padding_mode '{conv.padding_mode}' (allowed: 'zeros')")
    conv.padding = _explicit_padding(conv, lambda reason: rewriter.unsupported(node, reason))
    batchnorm = batchnorm_as(rewriter, fusion.batchnorm, nn.BatchNorm2d) if fusion.batchnorm is not None else None
    path = _weighted_path(rewriter, node, "conv2d")
    quantizer = _weighted_output_quantizer(rewriter, node, path, fusion)
    module = ConvAct2d(conv, batchnorm, fusion.activation, rewriter.scale_rule, quantizer)
    return rewriter.call(path, module, (argument(node, 0, "input"),), fusion.last)


@CANONICAL_EMITTERS.register(Op.LINEAR)
def _emit_linear(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    linear = rewriter.modules[node.target] if node.op == "call_module" else _functional_linear(rewriter, node)
    fusion = rewriter.fusions[node]
    batchnorm = batchnorm_as(rewriter, fusion.batchnorm, nn.BatchNorm1d) if fusion.batchnorm is not None else None
    path = _weighted_path(rewriter, node, "linear")
    quantizer = _weighted_output_quantizer(rewriter, node, path, fusion)
    module = LinearAct(linear, batchnorm, fusion.activation, rewriter.scale_rule, quantizer)
    return rewriter.call(path, module, (argument(node, 0, "input"),), fusion.last)


def _weighted_path(rewriter: Rewriter, node: fx.Node, base: str) -> str:
    """A layer's own path, or a functional call's (``F.linear`` in timm's ``Linear`` at ``head.fc``:
    ``head.fc.linear``)."""
    return str(node.target) if node.op == "call_module" else rewriter.functional_path(node, base)


def _parameters(rewriter: Rewriter, node: fx.Node, names: tuple[str, str]) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The weight and bias of an ``F.linear`` / ``F.conv2d`` call, which must be the model's own tensors (as an
    ``nn.Linear`` or ``nn.Conv2d`` subclass passes its ``self.weight`` and ``self.bias``); the prepared op shares
    them, so that training updates the model's parameters."""
    found = []
    for position, name in enumerate(names, start=1):
        value = argument(node, position, name)
        if value is not None and not (isinstance(value, fx.Node) and value.op == "get_attr"):
            raise rewriter.unsupported(node, f"its {name} is computed in forward, not a parameter or buffer of the model")
        tensor = None if value is None else getattr_path(rewriter.traced, str(value.target))
        found.append(tensor if tensor is None or isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False))
    return found[0], found[1]


def _functional_linear(rewriter: Rewriter, node: fx.Node) -> nn.Linear:
    """The ``nn.Linear`` an ``F.linear`` call computes, on the call's own weight and bias."""
    weight, bias = _parameters(rewriter, node, ("weight", "bias"))
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    return linear


def _functional_conv2d(rewriter: Rewriter, node: fx.Node) -> nn.Conv2d:
    """The ``nn.Conv2d`` an ``F.conv2d`` call computes, on the call's own weight and bias."""
    weight, bias = _parameters(rewriter, node, ("weight", "bias"))
    if weight.dim() != 4:
        raise rewriter.unsupported(node, f"a conv2d of a {weight.dim()}-D weight (allowed: 4-D)")
    groups = argument(node, 6, "groups", 1)
    conv = nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=argument(node, 3, "stride", 1),
        padding=argument(node, 4, "padding", 0),
        dilation=argument(node, 5, "dilation", 1),
        groups=groups,
        bias=bias is not None,
        device="meta",
    )
    conv.weight, conv.bias = weight, bias
    return conv


def _weighted_output_quantizer(rewriter: Rewriter, node: fx.Node, path: str, fusion: Fusion) -> ActivationFakeQuantize | None:
    if rewriter.qconfig(node, allows_int32=True).output_dtype == "int8":
        return rewriter.quantizer(node, path)
    if fusion.activation is not Activation.NONE:
        raise QuantizationError(
            f"{describe_node(node, rewriter.modules)}: an int32 output cannot have a fused "
            f"{fusion.activation.value}; use the int32 qconfig on a final layer without activation"
        )
    return None


@_pre_fusion(PreFusionOp.BATCH_NORM)
def _emit_batchnorm(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    """A BatchNorm with no conv or linear layer to fold into: a per-channel affine, i.e. a depthwise 1x1 conv of
    unit weights with the BatchNorm folded in (docs/numerics.md "BatchNorm"); a BatchNorm1d's (N, C) or (N, C, L)
    input is viewed as (N, C, 1, 1) or (N, C, L, 1) for it, and its output viewed back."""
    fusion = rewriter.fusions[node]
    info = tensor_info(node.args[0])
    if len(info.shape) not in (2, 3, 4):
        raise rewriter.unsupported(node, f"BatchNorm of a {len(info.shape)}-D tensor (allowed: (N, C), (N, C, L), (N, C, H, W))")
    batchnorm = batchnorm_as(rewriter, node, nn.BatchNorm2d)
    channels = info.shape[1]
    identity = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
    identity.weight.requires_grad_(False)
    nn.init.ones_(identity.weight)
    path = rewriter.functional_path(node, "batch_norm")
    module = ConvAct2d(identity, batchnorm, fusion.activation, rewriter.scale_rule, rewriter.quantizer(node, path))
    if len(info.shape) == 4:
        return rewriter.call(path, module, (node.args[0],), fusion.last)
    nchw = TensorInfo((*info.shape, 1, 1)[:4], info.dtype)
    viewed = rewriter.graph.call_method("reshape", (rewriter.floats.integer_value(node.args[0]), -1, *nchw.shape[1:]))
    viewed.meta[VALUE_KEY] = nchw
    conv = rewriter.call(path, module, (), fusion.last)
    conv.args, conv.meta[VALUE_KEY] = (viewed,), nchw
    output = rewriter.graph.call_method("reshape", (conv, -1, *info.shape[1:]))
    output.meta = dict(fusion.last.meta)
    return output


@CANONICAL_EMITTERS.register(Op.ADD)
def _emit_add(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    left, right = argument(node, 0, "input"), argument(node, 1, "other")
    if not (isinstance(left, fx.Node) and isinstance(right, fx.Node)):
        raise rewriter.unsupported(node, "only the sum of two quantized tensors is supported (not a constant)")
    if argument(node, 2, "alpha", 1) != 1:
        raise rewriter.unsupported(node, "add with alpha != 1")
    fusion = rewriter.fusions[node]
    path = rewriter.functional_path(node, "add")
    module = AddAct(fusion.activation, rewriter.quantizer(node, path))
    return rewriter.call(path, module, (left, right), fusion.last)


@CANONICAL_EMITTERS.register(Op.CONCAT)
def _emit_cat(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    tensors = list(argument(node, 0, "tensors"))
    rank = len(tensor_info(node).shape)
    dim = argument(node, 1, "dim", 0) % rank
    path = rewriter.functional_path(node, "cat")
    return rewriter.call(path, Concat(dim, rewriter.quantizer(node, path)), tensors, node)


def _pool_settings(rewriter: Rewriter, node: fx.Node, names: tuple[str, ...], defaults: tuple[object, ...]) -> list:
    """Pooling settings by name, from the module or from the functional call (same names in both)."""
    if node.op == "call_module":
        values = [getattr(rewriter.modules[node.target], name) for name in names]
    else:
        values = [argument(node, i + 1, name, default) for i, (name, default) in enumerate(zip(names, defaults))]
    kernel, stride, *rest = values
    return [pair(kernel), pair(stride or kernel), *rest]


@CANONICAL_EMITTERS.register(Op.MAX_POOL2D)
def _emit_maxpool2d(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    kernel, stride, padding, dilation, ceil_mode, return_indices = _pool_settings(
        rewriter,
        node,
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
        (None, None, 0, 1, False, False),
    )
    if return_indices:
        raise rewriter.unsupported(node, "max pooling with return_indices")
    module = MaxPool2d(kernel, stride, pair(padding), pair(dilation), ceil_mode=bool(ceil_mode))
    return rewriter.call(rewriter.functional_path(node, "max_pool2d"), module, (node.args[0],), node)


@CANONICAL_EMITTERS.register(Op.AVG_POOL2D)
def _emit_avg_pool2d(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    if _adaptive(node, rewriter.modules):
        return _emit_adaptive_avg_pool2d(rewriter, node)
    kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = _pool_settings(
        rewriter,
        node,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        (None, None, 0, False, True, None),
    )
    padding = pair(padding)
    if divisor_override is not None:
        raise rewriter.unsupported(node, "avg pooling with divisor_override")
    if any(padding) and not count_include_pad:
        raise rewriter.unsupported(node, "avg pooling over padding with count_include_pad=False (the divisor varies)")
    if ceil_mode and _pooled_size(node, kernel, stride, padding, ceil=True) != _pooled_size(
        node, kernel, stride, padding, ceil=False
    ):
        raise rewriter.unsupported(node, "avg pooling whose ceil_mode creates partial windows (the divisor varies)")
    path = rewriter.functional_path(node, "avg_pool2d")
    return rewriter.call(path, AvgPool2d(kernel, stride, padding, rewriter.quantizer(node, path)), (node.args[0],), node)


def _adaptive(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an average pool is spelled adaptive (its windows follow from the input and output sizes)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.AdaptiveAvgPool2d)
    return node.target is F.adaptive_avg_pool2d


def _emit_adaptive_avg_pool2d(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    source = node.args[0]
    height, width = tensor_info(source).shape[-2:]
    size = rewriter.modules[node.target].output_size if node.op == "call_module" else argument(node, 1, "output_size")
    size = size if isinstance(size, (tuple, list)) else (size, size)
    out_h, out_w = (height if size[0] is None else size[0]), (width if size[1] is None else size[1])
    path = rewriter.functional_path(node, "adaptive_avg_pool2d")
    if (out_h, out_w) == (1, 1):
        module: nn.Module = GlobalAvgPool2d(True, (height, width), rewriter.quantizer(node, path))
    elif height % out_h == 0 and width % out_w == 0:
        kernel = (height // out_h, width // out_w)
        module = AvgPool2d(kernel, kernel, (0, 0), rewriter.quantizer(node, path))
    else:
        return _emit_uneven_adaptive_avg_pool2d(rewriter, node, path, (out_h, out_w))
    return rewriter.call(path, module, (source,), node)


def _emit_uneven_adaptive_avg_pool2d(rewriter: Rewriter, node: fx.Node, path: str, out_size: tuple[int, int]) -> fx.Node:
    """Adaptive average pooling whose windows differ in size: the mean of each window (a global average pool
    of its slice) requantized straight to the pool's scale, the windows concatenated along W and viewed as
    the output grid (docs/numerics.md, "Adaptive average pooling")."""
    source = rewriter.floats.integer_value(node.args[0])
    info = tensor_info(node.args[0])
    quantizer = rewriter.quantizer(node, path)
    windows = itertools.product(*(enumerate(adaptive_windows(n, o)) for n, o in zip(info.shape[2:], out_size)))
    means = []
    for (row, (top, bottom)), (column, (left, right)) in windows:
        index = (slice(None), slice(None), slice(top, bottom), slice(left, right))
        window = rewriter.graph.call_function(operator.getitem, (source, index))
        window.meta[VALUE_KEY] = TensorInfo((*info.shape[:2], bottom - top, right - left), info.dtype)
        mean = GlobalAvgPool2d(True, (bottom - top, right - left), None)
        mean.share_output_scale_with(path)
        mean_path = f"{path}_{row}_{column}"
        rewriter.new_modules[mean_path] = mean
        means.append(rewriter.graph.call_module(mean_path, (window,)))
        means[-1].meta[VALUE_KEY] = TensorInfo((*info.shape[:2], 1, 1), info.dtype)
    concat = rewriter.call(path, Concat(3, quantizer), (), node)
    concat.args = tuple(means)
    concat.meta = {VALUE_KEY: TensorInfo((*info.shape[:2], 1, len(means)), info.dtype)}
    grid = rewriter.graph.call_method("reshape", (concat, -1, info.shape[1], *out_size))
    grid.meta = dict(node.meta)
    return grid


@CANONICAL_EMITTERS.register(Op.GLOBAL_AVG_POOL2D)
def _emit_mean(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    source = node.args[0]
    shape = tensor_info(source).shape
    dims = argument(node, 1, "dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if len(shape) != 4 or sorted(d % 4 for d in dims) != [2, 3] or argument(node, 3, "dtype") is not None:
        raise rewriter.unsupported(node, f"mean over dims {dims} of a {len(shape)}-D tensor (allowed: H and W of 4-D)")
    path = rewriter.functional_path(node, "mean")
    module = GlobalAvgPool2d(bool(argument(node, 2, "keepdim", False)), shape[2:], rewriter.quantizer(node, path))
    return rewriter.call(path, module, (source,), node)


@CANONICAL_EMITTERS.register(Op.UPSAMPLE_NEAREST2D)
def _emit_upsample(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    settings = interpolation(node, rewriter.modules)
    if settings.mode != "nearest":
        raise rewriter.unsupported(node, f"upsampling mode '{settings.mode}' (allowed: 'nearest', 'bilinear')")
    source = node.args[0]
    in_shape, out_shape = tensor_info(source).shape[-2:], tensor_info(node).shape[-2:]
    if any(o % i for o, i in zip(out_shape, in_shape)):
        raise rewriter.unsupported(node, f"upsampling {in_shape} to {out_shape} is not by integer factors")
    factor = (out_shape[0] // in_shape[0], out_shape[1] // in_shape[1])
    return rewriter.call(rewriter.functional_path(node, "upsample"), UpsampleNearest2d(factor), (source,), node)


@CANONICAL_EMITTERS.register(Op.UPSAMPLE_BILINEAR2D)
def _emit_bilinear(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    """Bilinear resize (docs/numerics.md, "Bilinear resize"): its coordinates are those of the input and output
    sizes, which torch also uses unless a ``scale_factor`` that does not give the output size exactly drives them
    (``align_corners=False``)."""
    settings = interpolation(node, rewriter.modules)
    source = node.args[0]
    in_shape, out_shape = tensor_info(source).shape, tensor_info(node).shape
    if len(in_shape) != 4:
        raise rewriter.unsupported(node, f"bilinear resize of a {len(in_shape)}-D tensor (allowed: 4-D NCHW)")
    if settings.antialias:
        raise rewriter.unsupported(node, "bilinear resize with antialias=True (allowed: antialias=False)")
    factors = settings.scale_factor
    if factors is not None and not settings.align_corners and not settings.recompute_scale_factor:
        factors = factors if isinstance(factors, (tuple, list)) else (factors, factors)
        if any(Fraction(f) * i != o for f, i, o in zip(factors, in_shape[2:], out_shape[2:])):
            raise rewriter.unsupported(
                node,
                f"bilinear resize by scale_factor {tuple(factors)} maps {tuple(in_shape[2:])} to "
                f"{tuple(out_shape[2:])} rows and columns inexactly (allowed: factors that give whole sizes, or size=)",
            )
    path = rewriter.functional_path(node, "upsample")
    module = UpsampleBilinear2d(tuple(out_shape[2:]), settings.align_corners, rewriter.quantizer(node, path))
    return rewriter.call(path, module, (source,), node)


@CANONICAL_EMITTERS.register(Op.RELU)
def _emit_relu(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    return _emit_clamp(rewriter, node, "relu", (0.0, math.inf))


@_pre_fusion(PreFusionOp.RELU6)
def _emit_relu6(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    return _emit_clamp(rewriter, node, "relu6", (0.0, RELU6_CEILING))


@_pre_fusion(PreFusionOp.HARDTANH)
def _emit_hardtanh(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    bounds = clamp_bounds(node, rewriter.modules)
    if not all(isinstance(bound, (int, float)) for bound in bounds):
        raise rewriter.unsupported(node, "clamp to tensor bounds (allowed: constant bounds)")
    return _emit_clamp(rewriter, node, "hardtanh", bounds)


def _emit_clamp(rewriter: Rewriter, node: fx.Node, name: str, bounds: tuple[float, float]) -> fx.Node:
    path = rewriter.functional_path(node, name)
    return rewriter.call(path, Clamp(name, bounds), (node.args[0],), node)


@CANONICAL_EMITTERS.register(*LOOKUP_TABLE_OPS)
def _emit_lookup_table(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    op = rewriter.kinds[node]
    fusion = rewriter.fusions.get(node)
    if fusion is not None:
        op = gated_op(op)
    alpha = 0.0
    if op.info.alpha is not None:
        name, default = op.info.alpha
        alpha = getattr(rewriter.modules[node.target], name) if node.op == "call_module" else argument(node, 1, name, default)
    path = rewriter.functional_path(node, op.value)
    module = LookupTableActivation(op, alpha, rewriter.quantizer(node, path))
    return rewriter.call(path, module, (node.args[0],), fusion.last if fusion else node)


@CANONICAL_EMITTERS.register(Op.MUL)
def _emit_mul(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    left, right = argument(node, 0, "input"), argument(node, 1, "other")
    if not all(makes_one_tensor(operand) for operand in (left, right)):
        raise rewriter.unsupported(node, "only the product of two quantized tensors is supported (not a constant)")
    path = rewriter.functional_path(node, "mul")
    return rewriter.call(path, Multiply(rewriter.quantizer(node, path)), (left, right), node)


@CANONICAL_EMITTERS.register(Op.MATMUL)
def _emit_matmul(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    """A matrix product of two activations (docs/numerics.md, "Matrix product"); ``torch.bmm`` names its second
    operand ``mat2``."""
    left, right = argument(node, 0, "input"), argument(node, 1, "other", node.kwargs.get("mat2"))
    if not (makes_one_tensor(left) and makes_one_tensor(right)):
        raise rewriter.unsupported(node, "only the matrix product of two quantized tensors is supported (not a constant)")
    ranks = [len(tensor_info(operand).shape) for operand in (left, right)]
    if min(ranks) < 2:
        raise rewriter.unsupported(node, f"matrix product of {ranks[0]}-D and {ranks[1]}-D tensors (allowed: 2-D or more)")
    path = rewriter.functional_path(node, "matmul")
    module = MatMul(tensor_info(left).shape[-1], rewriter.quantizer(node, path))
    return rewriter.call(path, module, (left, right), node)


@_pre_fusion(PreFusionOp.DROPOUT, PreFusionOp.ALIAS)
@CANONICAL_EMITTERS.register(*(op for op in MOVEMENT_OPS if op is not Op.PAD))
def _emit_as_written(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    """Data movement, aliases and dropout are kept as the user wrote them; indexing with a tensor (a gather) is no
    movement of constant positions."""
    if rewriter.kinds.get(node) is Op.SLICE and any(produces_tensor(arg) for arg in node.all_input_nodes[1:]):
        raise rewriter.unsupported(node, "indexing with a tensor (allowed: constant ints and slices)")
    return rewriter.copy(node)


@CANONICAL_EMITTERS.register(Op.PAD)
def _emit_pad(rewriter: Rewriter, node: fx.Node) -> fx.Node:
    """A pad with zeros, kept as written: on the integers it writes the zero point, 0."""
    settings = padding(node, rewriter.modules)
    if settings.mode != "constant":
        raise rewriter.unsupported(node, f"padding mode '{settings.mode}' (allowed: 'constant' with zeros)")
    if settings.value != 0.0:
        raise rewriter.unsupported(node, f"padding with {settings.value} (allowed: zeros)")
    if any(p < 0 for p in settings.pad):
        raise rewriter.unsupported(node, f"negative padding {list(settings.pad)} (a crop: slice instead)")
    return rewriter.copy(node)


def _explicit_padding(conv: nn.Conv2d, unsupported: Callable[[str], Exception]) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(total % 2 for total in totals):
        raise unsupported("padding='same' with an even kernel pads unevenly; pad explicitly")
    return (totals[0] // 2, totals[1] // 2)


def adaptive_windows(size: int, out_size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each of adaptive pooling's ``out_size`` windows over ``size`` (PyTorch's rule)."""
    return [(i * size // out_size, -(-(i + 1) * size // out_size)) for i in range(out_size)]


def _pooled_size(
    node: fx.Node, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], ceil: bool
) -> tuple[int, ...]:
    size = tensor_info(node.args[0]).shape[-2:]
    result = []
    for length, k, s, p in zip(size, kernel, stride, padding):
        span = length + 2 * p - k
        out = (-(-span // s) if ceil else span // s) + 1
        if ceil and (out - 1) * s >= length + p:
            out -= 1
        result.append(out)
    return tuple(result)
