"""An independent int64 numpy reference of docs/numerics.md, for tests only.

Written from the spec, not from edgeq.numerics: division by powers of two uses ``np.floor_divide`` (not shifts),
convolution is an explicit sum over kernel taps, and nothing runs in floating point except the float32
quantize / dequantize steps that the spec defines in float32, and the ops of the float fallback, which run in
torch as the spec says. The interpreter at the bottom evaluates an integer model's graph with these functions, op
by op. ``rounding`` is the spec's rule name (``half_to_even``, or ``half_up``: section 6.1), read from each op.
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from edgeq.quantization import integer_ops as ops


def round_shift(values: np.ndarray, multiplier: Any, shift: Any, rounding: str = "half_to_even") -> np.ndarray:
    """values * M / 2**n rounded to nearest, ties to even or up, in int64 (floor division and remainder, no
    shifts; Python's integers where the product or 2**n would pass int64)."""
    values, multiplier, shift = (np.asarray(a, dtype=np.int64) for a in (values, multiplier, shift))
    if values.size and (int(np.abs(values).max()) * int(multiplier.max()) >= 2**62 or shift.max() > 62):
        values, multiplier = values.astype(object), multiplier.astype(object)  # beyond int64: Python's integers
    product = values * multiplier
    power = np.vectorize(lambda n: 1 << int(n), otypes=[object])(shift) if product.dtype == object else np.left_shift(np.int64(1), shift)
    half = power // 2
    if rounding == "half_up":
        return np.floor_divide(product + half, power).astype(np.int64)
    quotient = product // power
    remainder = product - quotient * power
    return (quotient + ((remainder > half) | ((remainder == half) & (quotient % 2 == 1)))).astype(np.int64)


def round_half(values: np.ndarray, rounding: str) -> np.ndarray:
    """float32 values rounded to integers: ``np.rint`` (half to even), or ``floor(x + 1/2)`` in float64 (half up:
    exact for a float32 ``x`` of magnitude above 2**-30, and 0 as it should be below)."""
    if rounding == "half_up":
        return np.floor(np.asarray(values, dtype=np.float64) + 0.5)
    return np.rint(values)


def saturate8(values: np.ndarray, low: int = -128, high: int = 127) -> np.ndarray:
    return np.clip(values, low, high).astype(np.int64)


def quantize(values: np.ndarray, scale: float, rounding: str = "half_to_even") -> np.ndarray:
    scaled = np.asarray(values, dtype=np.float32) / np.float32(scale)
    return saturate8(round_half(scaled, rounding).astype(np.int64))


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(np.float32) * np.asarray(scales, dtype=np.float32)


def conv2d_accumulate(
    x: np.ndarray, weight: np.ndarray, stride: tuple, padding: tuple, dilation: tuple, groups: int
) -> np.ndarray:
    """int64 sum over kernel taps: out[n,o,y,x] = sum_{c,i,j} x[n, g*Cg+c, y*s+i*d, x*s+j*d] * w[o,c,i,j]."""
    x = np.asarray(x, dtype=np.int64)
    weight = np.asarray(weight, dtype=np.int64)
    batch, channels, height, width = x.shape
    out_channels, per_group, kh, kw = weight.shape
    padded = np.zeros((batch, channels, height + 2 * padding[0], width + 2 * padding[1]), dtype=np.int64)
    padded[:, :, padding[0] : padding[0] + height, padding[1] : padding[1] + width] = x
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((batch, out_channels, out_h, out_w), dtype=np.int64)
    outs_per_group = out_channels // groups
    for g in range(groups):
        xs = padded[:, g * per_group : (g + 1) * per_group]
        ws = weight[g * outs_per_group : (g + 1) * outs_per_group]
        for i in range(kh):
            for j in range(kw):
                top, left = i * dilation[0], j * dilation[1]
                window = xs[:, :, top : top + stride[0] * (out_h - 1) + 1 : stride[0], left : left + stride[1] * (out_w - 1) + 1 : stride[1]]
                out[:, g * outs_per_group : (g + 1) * outs_per_group] += np.einsum("ncyx,oc->noyx", window, ws[:, :, i, j])
    return out


def matmul_accumulate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int64 sum over the reduction axis, one product at a time: out[..., i, j] = sum_k a[..., i, k] * b[..., k, j],
    leading axes broadcast (numpy's rule, which torch.matmul and ONNX MatMul follow)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = np.broadcast_to(a, (*lead, *a.shape[-2:])), np.broadcast_to(b, (*lead, *b.shape[-2:]))
    out = np.zeros((*lead, a.shape[-2], b.shape[-1]), dtype=np.int64)
    for k in range(a.shape[-1]):
        out += a[..., :, k : k + 1] * b[..., k : k + 1, :]
    return out


def requantize_channels(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, axis: int, rounding: str = "half_to_even") -> np.ndarray:
    shape = [1] * acc.ndim
    shape[axis] = -1
    return round_shift(acc, np.reshape(multiplier, shape), np.reshape(shift, shape), rounding)


def weighted_output(op: ops._WeightedOp, acc: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * acc.ndim
    shape[axis] = -1
    acc = acc + op.bias.numpy().astype(np.int64).reshape(shape)
    if op.output.dtype == "int32":
        return acc
    return saturate8(requantize_channels(acc, op.multiplier.numpy(), op.shift.numpy(), axis, op.rounding.value), *op.clamp)


def window_view(x: np.ndarray, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple, fill: int) -> np.ndarray:
    """[N, C, out_h, out_w, kh*kw] windows of a zero/fill-padded input (floor mode)."""
    batch, channels, height, width = x.shape
    padded = np.full((batch, channels, height + 2 * padding[0], width + 2 * padding[1]), fill, dtype=np.int64)
    padded[:, :, padding[0] : padding[0] + height, padding[1] : padding[1] + width] = x
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            top, left = i * dilation[0], j * dilation[1]
            taps.append(padded[:, :, top : top + stride[0] * (out_h - 1) + 1 : stride[0], left : left + stride[1] * (out_w - 1) + 1 : stride[1]])
    return np.stack(taps, axis=-1)


_ACTIVATIONS = {
    "sigmoid": lambda x, alpha: 0.5 * (1 + np.tanh(x / 2)),
    "tanh": lambda x, alpha: np.tanh(x),
    "hardsigmoid": lambda x, alpha: np.clip(x / 6 + 0.5, 0, 1),
    "hardswish": lambda x, alpha: x * np.clip(x + 3, 0, 6) / 6,
    "silu": lambda x, alpha: x * 0.5 * (1 + np.tanh(x / 2)),
    "leakyrelu": lambda x, alpha: np.where(x >= 0, x, np.float64(np.float32(alpha)) * x),
    "gelu": lambda x, alpha: x * (1 + _erf(x * np.sqrt(0.5))) / 2,
    "gelu_tanh": lambda x, alpha: x * (1 + np.tanh(np.sqrt(2 / np.pi) * x * (1 + 0.044715 * x * x))) / 2,
    "elu": lambda x, alpha: np.where(x > 0, x, np.float64(np.float32(alpha)) * np.expm1(np.minimum(x, 0))),
}


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 by torch's implementation (numpy has none; edgeq's tables use Python's ``math.erf``)."""
    return torch.special.erf(torch.from_numpy(x)).numpy()


def lookup_table(function: str, input_scale: float, output_scale: float, alpha: float = 0.0, rounding: str = "half_to_even") -> np.ndarray:
    """The spec's table, vectorised in numpy float64 (sigmoid through tanh, erf through torch): index q + 128 holds
    the output for q; half up as ``floor(y + 1/2)`` computed exactly on fractions."""
    x = dequantize(np.arange(-128, 128), input_scale).astype(np.float64)
    y = _ACTIVATIONS[function](x, alpha) / np.float64(np.float32(output_scale))
    if rounding == "half_up":
        return saturate8(np.array([math.floor(Fraction(float(v)) + Fraction(1, 2)) for v in y], dtype=np.int64))
    return saturate8(np.rint(y).astype(np.int64))


BILINEAR_ONE = 2048
"""2**F with F = 11 fraction bits (docs/numerics.md, "Bilinear resize")."""


def bilinear_axis(in_size: int, out_size: int, align_corners: bool) -> list[tuple[int, int, int, int]]:
    """(low, high, weight_low, weight_high) of each output index along one axis, from the spec's source coordinate as a
    ``Fraction``: ``(i + 1/2) * in / out - 1/2`` clamped at 0, or ``i * (in - 1) / (out - 1)``."""
    taps = []
    for i in range(out_size):
        if align_corners:
            source = Fraction(i * (in_size - 1), out_size - 1) if out_size > 1 else Fraction(0)
        else:
            source = max(Fraction(2 * i + 1, 2) * Fraction(in_size, out_size) - Fraction(1, 2), Fraction(0))
        low = math.floor(source)
        weight = round((source - low) * BILINEAR_ONE)  # Python rounds a Fraction half to even
        taps.append((low, min(low + 1, in_size - 1), BILINEAR_ONE - weight, weight))
    return taps


def bilinear_resize(
    x: np.ndarray, size: tuple[int, int], align_corners: bool, multiplier: int, shift: int, rounding: str = "half_to_even"
) -> np.ndarray:
    """The four-tap integer sum of each output pixel, requantized and saturated, pixel by pixel."""
    x = np.asarray(x, dtype=np.int64)
    rows = bilinear_axis(x.shape[2], size[0], align_corners)
    columns = bilinear_axis(x.shape[3], size[1], align_corners)
    acc = np.zeros((*x.shape[:2], *size), dtype=np.int64)
    for i, (top, bottom, w_top, w_bottom) in enumerate(rows):
        for j, (left, right, w_left, w_right) in enumerate(columns):
            acc[:, :, i, j] = (
                x[:, :, top, left] * w_top * w_left + x[:, :, top, right] * w_top * w_right
                + x[:, :, bottom, left] * w_bottom * w_left + x[:, :, bottom, right] * w_bottom * w_right
            )
    return saturate8(round_shift(acc, multiplier, shift, rounding))


def clamp_levels(bounds: tuple[float, float], scale: float, rounding: str = "half_to_even") -> tuple[int, int]:
    """A clamp's real bounds as int8 at ``scale``, as ReLU6's ceiling: float32 quotient rounded by the rule,
    saturated; an infinite bound is none."""
    levels = [round_half(np.float32(b) / np.float32(scale), rounding) if np.isfinite(b) else np.sign(b) * 1000 for b in bounds]
    return tuple(int(level) for level in saturate8(np.array(levels)))


def evaluate_op(module: torch.nn.Module, args: list[Any]) -> Any:
    """One integer op in numpy int64, rounding by the op's rule."""
    rounding = module.rounding.value if hasattr(module, "rounding") else "half_to_even"
    if isinstance(module, ops.IntQuantize):
        (x,) = args
        return x if x.dtype == np.int8 else quantize(x, module.output_scale, rounding)
    if isinstance(module, (ops.IntDequantize, ops.IntEnterFloat)):
        (x,) = args
        scales = np.asarray(module.quant.scales, dtype=np.float32)
        if module.quant.axis is not None:
            shape = [1] * x.ndim
            shape[module.quant.axis] = -1
            scales = scales.reshape(shape)
        return dequantize(x, scales if module.quant.axis is not None else scales[0])
    if isinstance(module, ops.IntConv2d):
        acc = conv2d_accumulate(args[0], module.weight.numpy(), module.stride, module.padding, module.dilation, module.groups)
        return weighted_output(module, acc, axis=1)
    if isinstance(module, ops.IntLinear):
        acc = np.asarray(args[0], dtype=np.int64) @ module.weight.numpy().astype(np.int64).T
        return weighted_output(module, acc, axis=acc.ndim - 1)
    if isinstance(module, ops.IntAdd):
        left, right = (np.asarray(a, dtype=np.int64) for a in args)
        total = left * module.multipliers[0] + right * module.multipliers[1]
        return saturate8(round_shift(total, 1, module.shift, rounding), *module.clamp)
    if isinstance(module, ops.IntConcat):
        parts = [saturate8(round_shift(a, m.multiplier, m.shift, rounding)) for a, m in zip(args, module.multipliers)]
        return np.concatenate(parts, axis=module.dim)
    if isinstance(module, ops.IntAvgPool2d):
        windows = window_view(np.asarray(args[0], dtype=np.int64), module.kernel_size, module.stride, module.padding, (1, 1), 0)
        return saturate8(round_shift(windows.sum(axis=-1), module.multiplier.multiplier, module.multiplier.shift, rounding))
    if isinstance(module, ops.IntGlobalAvgPool2d):
        total = np.asarray(args[0], dtype=np.int64).sum(axis=(2, 3), keepdims=module.keepdim)
        return saturate8(round_shift(total, module.multiplier.multiplier, module.multiplier.shift, rounding))
    if isinstance(module, ops.IntMaxPool2d):
        assert not module.ceil_mode
        windows = window_view(np.asarray(args[0], dtype=np.int64), module.kernel_size, module.stride, module.padding, module.dilation, -(2**40))
        return windows.max(axis=-1)
    if isinstance(module, ops.IntClamp):
        return np.clip(args[0], module.low, module.high)
    if isinstance(module, ops.IntUpsampleNearest2d):
        fh, fw = module.scale_factor
        return np.repeat(np.repeat(args[0], fh, axis=2), fw, axis=3)
    if isinstance(module, ops.IntUpsampleBilinear2d):
        multiplier = module.multiplier
        return bilinear_resize(args[0], module.size, module.align_corners, multiplier.multiplier, multiplier.shift, rounding)
    if isinstance(module, ops.IntMul):
        product = np.asarray(args[0], dtype=np.int64) * np.asarray(args[1], dtype=np.int64)
        return saturate8(round_shift(product, module.multiplier.multiplier, module.multiplier.shift, rounding))
    if isinstance(module, ops.IntMatMul):
        return saturate8(round_shift(matmul_accumulate(*args), module.multiplier.multiplier, module.multiplier.shift, rounding))
    if isinstance(module, ops.IntLookupTable):
        table = lookup_table(module.op.value, module.input_scale, module.output_scale, module.alpha, rounding)
        return table[np.asarray(args[0], dtype=np.int64) + 128]
    raise NotImplementedError(type(module).__name__)


def _to_torch(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "iu" else value)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_torch(v) for v in value)
    return value


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().numpy()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def run_reference(graph_module: fx.GraphModule, *inputs: np.ndarray, stop_at_dequantize: bool = True) -> Any:
    """Evaluate an integer graph node by node: integer ops in numpy int64; data-movement nodes (view, transpose,
    getitem, size...) with torch on int64 copies, since they do no arithmetic."""
    modules = dict(graph_module.named_modules())
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    for node in graph_module.graph.nodes:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            return args[0]
        elif node.op == "get_attr":
            env[node] = _to_numpy(operator.attrgetter(node.target)(graph_module))
        elif node.op == "call_module" and isinstance(modules[node.target], ops.IntDequantize) and stop_at_dequantize:
            env[node] = np.asarray(args[0], dtype=np.int64)
        elif node.op == "call_module" and type(modules[node.target]).__module__ == ops.__name__:
            env[node] = evaluate_op(modules[node.target], list(args))
        elif node.op == "call_module":
            env[node] = _to_numpy(modules[node.target](*_to_torch(args)))
        elif node.op == "call_function":
            env[node] = _to_numpy(node.target(*_to_torch(args), **kwargs))
        elif node.op == "call_method":
            receiver, *rest = _to_torch(args)
            env[node] = _to_numpy(getattr(receiver, node.target)(*rest, **kwargs))
        else:
            raise NotImplementedError(node.op)
    raise AssertionError("graph without output")
