"""Each integer op against the independent int64 numpy reference: exact equality over random shapes and values,
with saturation and rounding ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference
import torch
import torch.nn.functional as F
from reference import evaluate_op

from edgeq.errors import QuantizationError
from edgeq.numerics import (
    FixedPointMultiplier,
    bilinear_multiplier,
    bilinear_taps,
    clamp_levels,
    lookup_table,
    quantize_multiplier,
    relu6_ceiling,
)
from edgeq.ops import LOOKUP_TABLE_OPS, Op
from edgeq.quantization import integer_ops as ops

RNG = np.random.default_rng(2024)


def int8(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(RNG.integers(-128, 128, size=shape, dtype=np.int64)).to(torch.int8)


def multipliers(count: int, low_shift: int, high_shift: int) -> list[FixedPointMultiplier]:
    return [
        FixedPointMultiplier(int(RNG.integers(2**30, 2**31)), int(RNG.integers(low_shift, high_shift)))
        for _ in range(count)
    ]


def check(module: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    got = module(*inputs).numpy()
    expected = evaluate_op(module, [t.numpy() for t in inputs])
    np.testing.assert_array_equal(got, expected)
    return got


CONV_CASES = [
    # (batch, in, out, size, kernel, stride, padding, dilation, groups)
    (2, 3, 8, 9, 3, 1, 1, 1, 1),
    (1, 16, 16, 8, 3, 2, 1, 1, 16),  # depthwise
    (1, 8, 12, 7, 1, 1, 0, 1, 4),
    (2, 4, 6, 11, 5, 2, 2, 1, 2),
    (1, 5, 7, 10, 3, 1, 2, 2, 1),  # dilation
    (1, 64, 32, 6, 3, 1, 1, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("clamp", [(-128, 127), (0, 127), (0, 96)])
def test_conv2d(case, clamp):
    batch, cin, cout, size, kernel, stride, padding, dilation, groups = case
    weight = int8((cout, cin // groups, kernel, kernel)).clamp(-127, 127)
    bias = torch.from_numpy(RNG.integers(-(2**16), 2**16, size=cout)).to(torch.int32)
    # shifts from 8 to 20 on 31-bit multipliers: many outputs saturate, many do not
    op = ops.IntConv2d(
        weight, bias, 0.1, [0.01] * cout, ops.TensorQuant("int8", (0.2,)), multipliers(cout, 30, 42), clamp,
        (stride, stride), (padding, padding), (dilation, dilation), groups,
    )
    out = check(op, int8((batch, cin, size, size)))
    assert (out == clamp[1]).any() and (out == clamp[0]).any() and ((out > clamp[0]) & (out < clamp[1])).any()


def test_conv2d_int32_output():
    weight = int8((6, 4, 3, 3)).clamp(-127, 127)
    bias = torch.from_numpy(RNG.integers(-(2**20), 2**20, size=6)).to(torch.int32)
    op = ops.IntConv2d(
        weight, bias, 0.1, [0.01] * 6, ops.TensorQuant("int32", (0.001,) * 6, axis=1), None, None,
        (1, 1), (1, 1), (1, 1), 1,
    )
    out = check(op, int8((2, 4, 5, 5)))
    assert out.dtype == np.int32


def test_conv2d_rounding_ties_go_to_even():
    # multiplier 0.5, all-ones 1x1 kernel: odd inputs sit exactly on .5
    op = ops.IntConv2d(
        torch.ones(1, 1, 1, 1, dtype=torch.int8), torch.zeros(1, dtype=torch.int32), 1.0, [1.0],
        ops.TensorQuant("int8", (2.0,)), [FixedPointMultiplier(2**30, 31)], (-128, 127), (1, 1), (0, 0), (1, 1), 1,
    )
    x = torch.tensor([-5, -3, -1, 1, 3, 5], dtype=torch.int8).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(check(op, x).ravel(), [-2, -2, 0, 0, 2, 2])


@pytest.mark.parametrize("shape", [(3, 17), (2, 5, 64)])
def test_linear(shape):
    out_features = 9
    weight = int8((out_features, shape[-1])).clamp(-127, 127)
    bias = torch.from_numpy(RNG.integers(-5000, 5000, size=out_features)).to(torch.int32)
    op = ops.IntLinear(
        weight, bias, 0.1, [0.02] * out_features, ops.TensorQuant("int8", (0.3,)),
        multipliers(out_features, 36, 44), (-128, 127),
    )
    check(op, int8(shape))
    int32_op = ops.IntLinear(
        weight, bias, 0.1, [0.02] * out_features, ops.TensorQuant("int32", (0.002,) * out_features, axis=-1), None, None
    )
    check(int32_op, int8(shape))


@pytest.mark.parametrize("clamp", [(-128, 127), (0, 127)])
def test_add(clamp):
    for _ in range(20):
        ma, mb = (int(m) for m in RNG.integers(2**28, 2**31, size=2))
        op = ops.IntAdd((0.1, 0.2), 0.15, (ma, mb), int(RNG.integers(29, 33)), clamp)
        check(op, int8((2, 8, 5, 5)), int8((2, 8, 5, 5)))


def test_add_ties_and_broadcast():
    op = ops.IntAdd((1.0, 1.0), 2.0, (2**30, 2**30), 31, (-128, 127))
    a = torch.tensor([[1, 2, -1, -2, 127]], dtype=torch.int8)
    b = torch.tensor([[0], [1]], dtype=torch.int8)
    np.testing.assert_array_equal(check(op, a, b), [[0, 1, 0, -1, 64], [1, 2, 0, 0, 64]])


def test_concat():
    op = ops.IntConcat(1, [0.1, 0.2, 0.05], 0.1, [FixedPointMultiplier(2**30, 30), FixedPointMultiplier(2**30, 29), FixedPointMultiplier(2**30, 31)])
    out = check(op, int8((2, 3, 4, 4)), int8((2, 2, 4, 4)), int8((2, 1, 4, 4)))
    assert out.shape == (2, 6, 4, 4)


@pytest.mark.parametrize("kernel,stride,padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0))])
def test_avg_pool(kernel, stride, padding):
    count = kernel[0] * kernel[1]
    multiplier = quantize_multiplier(0.1 / (0.07 * count), what="t")
    op = ops.IntAvgPool2d(kernel, stride, padding, 0.1, 0.07, multiplier)
    check(op, int8((2, 3, 9, 8)))


@pytest.mark.parametrize("keepdim", [True, False])
def test_global_avg_pool(keepdim):
    op = ops.IntGlobalAvgPool2d(keepdim, (7, 7), 0.1, 0.05, FixedPointMultiplier(int(RNG.integers(2**30, 2**31)), 35))
    check(op, int8((3, 16, 7, 7)))


def test_global_avg_pool_rejects_other_sizes():
    op = ops.IntGlobalAvgPool2d(True, (7, 7), 0.1, 0.05, FixedPointMultiplier(2**30, 35))
    with pytest.raises(Exception, match=r"input is \(5, 5\) but the model was converted for \(7, 7\)"):
        op(int8((1, 2, 5, 5)))


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 2)])
def test_max_pool(kernel, stride, padding, dilation):
    op = ops.IntMaxPool2d((kernel, kernel), (stride, stride), (padding, padding), (dilation, dilation), False)
    x = int8((2, 4, 9, 9))
    x[0, 0] = -128  # an all-minimum plane: padding must never win
    check(op, x)


BILINEAR_CASES = [
    # (input H, W), output (H, W), align_corners
    ((4, 4), (8, 8), False),  # x2: exact fixed-point weights
    ((7, 5), (13, 11), False),  # odd ratios
    ((7, 5), (13, 11), True),
    ((3, 6), (9, 18), True),
    ((9, 7), (4, 3), False),  # down
    ((9, 7), (4, 3), True),
    ((1, 3), (5, 1), False),  # a single input row, a single output column
]


@pytest.mark.parametrize("source,size,align_corners", BILINEAR_CASES)
def test_bilinear_resize(source, size, align_corners):
    # shifts 50..56 around the weights' 2**22: outputs from saturated to well inside the range
    (multiplier,) = multipliers(1, 50, 56)
    op = ops.IntUpsampleBilinear2d(size, align_corners, 0.1, 0.1, multiplier)
    check(op, int8((2, 3, *source)))


def test_bilinear_resize_saturates_and_rounds_ties_to_even():
    # same size: each output is its input times 2**22; times 4 saturates, times 1/2 puts odd inputs on a tie
    x = torch.tensor([-128, -5, -3, -1, 1, 3, 5, 127], dtype=torch.int8).reshape(1, 1, 2, 4)
    times_four = ops.IntUpsampleBilinear2d((2, 4), False, 1.0, 0.25, FixedPointMultiplier(2**30, 50))
    np.testing.assert_array_equal(check(times_four, x).ravel(), [-128, -20, -12, -4, 4, 12, 20, 127])
    half = ops.IntUpsampleBilinear2d((2, 4), True, 1.0, 2.0, FixedPointMultiplier(2**30, 53))
    np.testing.assert_array_equal(check(half, x).ravel(), [-64, -2, -2, 0, 0, 2, 2, 64])


@pytest.mark.parametrize("source,size,align_corners", BILINEAR_CASES)
@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_bilinear_resize_is_within_one_step_of_torch(source, size, align_corners, ratio):
    """Against F.interpolate in float32 on the dequantized input, quantized to the output scale: the fixed-point
    weights move the sum by at most 255 * 2**-11 input steps, under one output step for s_in / s_out < 8."""
    input_scale = 0.05
    output_scale = input_scale / ratio
    op = ops.IntUpsampleBilinear2d(size, align_corners, input_scale, output_scale, bilinear_multiplier(input_scale, output_scale, what="test"))
    x = int8((4, 3, *source))
    real = F.interpolate(x.to(torch.float32) * np.float32(input_scale), size=size, mode="bilinear", align_corners=align_corners)
    expected = torch.clamp(torch.round(real / np.float32(output_scale)), -128, 127)
    differences = (op(x).to(torch.int64) - expected.to(torch.int64)).abs()
    assert int(differences.max()) <= 1


def test_bilinear_weights_are_exact_and_round_ties_to_even():
    taps = bilinear_taps(4, 8, False)  # x2, half pixel: coordinates -1/4 (clamped to 0), 1/4, 3/4, 5/4...
    np.testing.assert_array_equal(taps.low, [0, 0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(taps.high, [1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(taps.weight_high, [0, 512, 1536, 512, 1536, 512, 1536, 512])
    np.testing.assert_array_equal(taps.weight_low + taps.weight_high, [2048] * 8)
    # align_corners from 2 to 4097: coordinate i / 4096, weight i / 2: odd i are ties, rounded to even
    ties = bilinear_taps(2, 4097, True)
    np.testing.assert_array_equal(ties.weight_high[:7], [0, 0, 1, 2, 2, 2, 3])
    assert ties.low[-1] == ties.high[-1] == 1 and ties.weight_high[-1] == 0


def test_clamp_levels_round_like_relu6_and_saturate():
    """A clamp's real bounds at s = 1/2: ties to even (0.25 -> 0, 0.75 -> 2, -0.25 -> 0), saturation, no bound."""
    for bounds in [(0.25, 0.75), (-0.25, 100.0), (-1000.0, math.inf), (-math.inf, -0.75), (0.0, 6.0)]:
        assert clamp_levels(bounds, 0.5) == reference.clamp_levels(bounds, 0.5)
    assert clamp_levels((0.25, 0.75), 0.5) == (0, 2) and clamp_levels((-0.25, 100.0), 0.5) == (0, 127)
    assert clamp_levels((-1000.0, math.inf), 0.5) == (-128, 127) and clamp_levels((0.0, 6.0), 0.1) == (0, relu6_ceiling(0.1))


def test_clamp_upsample_quantize_dequantize():
    check(ops.IntClamp(0, 96), int8((2, 3, 4, 4)))
    check(ops.IntUpsampleNearest2d((2, 3)), int8((1, 2, 3, 4)))
    x = torch.from_numpy(RNG.normal(0, 2, size=(2, 3, 5)).astype(np.float32))
    check(ops.IntQuantize(0.037), x)
    raw = int8((2, 3))
    assert ops.IntQuantize(1 / 128)(raw) is raw
    check(ops.IntDequantize(ops.TensorQuant("int8", (0.037,))), int8((2, 3)))
    per_channel = ops.IntDequantize(ops.TensorQuant("int32", (0.1, 0.2, 0.3), axis=1))
    check(per_channel, torch.from_numpy(RNG.integers(-(2**30), 2**30, size=(2, 3, 4))).to(torch.int32))


@pytest.mark.parametrize("function", LOOKUP_TABLE_OPS, ids=lambda op: op.value)
def test_lookup_table_activations(function):
    """Every int8 input, at random scales and at scales that saturate, against the numpy reference."""
    everything = torch.arange(-128, 128, dtype=torch.int64).to(torch.int8).reshape(4, 64)
    for input_scale, output_scale in [(RNG.uniform(0.01, 0.1), RNG.uniform(0.005, 0.05)), (0.2, 0.001)]:
        table = torch.from_numpy(lookup_table(function, input_scale, output_scale, 0.1))
        op = ops.IntLookupTable(function, 0.1, input_scale, output_scale, table)
        got = check(op, everything)
        if output_scale == 0.001:
            assert got.max() == 127  # saturates
            if function in (Op.TANH, Op.LEAKYRELU, Op.GELU, Op.GELU_TANH):
                assert got.min() == -128  # GELU's minimum, about -0.17, is below -128 * 0.001


def test_lookup_table_goldens_and_ties():
    """Literal values: hardswish at s = 1/2; LeakyReLU's identity half at s_out = 2 s_in rounds ties to even."""
    hardswish = lookup_table(Op.HARDSWISH, 0.5, 0.5)
    assert hardswish[np.array([2, 4, 6, -8, -1, 127]) + 128].tolist() == [1, 3, 6, 0, 0, 127]
    leaky = lookup_table(Op.LEAKYRELU, 1.0, 2.0, 0.25)
    assert leaky[np.array([1, 3, 5, 7, -2, -6, -10]) + 128].tolist() == [0, 2, 2, 4, 0, -1, -1]
    elu = lookup_table(Op.ELU, 1.0, 2.0, 2.0)  # the same ties on the identity half; 2 * (e^x - 1) / 2 below zero
    assert elu[np.array([1, 3, 5, 0, -1, -10, -128]) + 128].tolist() == [0, 2, 2, 0, -1, -1, -1]


def test_gelu_tables_goldens_ties_and_their_two_forms():
    """Both GELU forms are x itself above x = 8 in float64: at s_in = 1, s_out = 2 the odd q are ties (9 / 2 = 4.5)
    and round to even; below, each form keeps its own function (they differ at q = -58 of s_in = 0.05, s_out = 0.01:
    GELU(-2.9) = -0.0054, its tanh form -0.0049)."""
    for op in (Op.GELU, Op.GELU_TANH):
        table = lookup_table(op, 1.0, 2.0)
        assert table[np.array([9, 11, 13, 127, 3, 2, 1, 0, -1, -9, -128]) + 128].tolist() == [4, 6, 6, 64, 1, 1, 0, 0, 0, 0, 0]
    exact, tanh_form = lookup_table(Op.GELU, 0.05, 0.01), lookup_table(Op.GELU_TANH, 0.05, 0.01)
    assert (exact[-58 + 128], tanh_form[-58 + 128]) == (-1, 0)
    assert np.flatnonzero(exact != tanh_form).tolist() == [-58 + 128]


def test_mul_broadcasts_and_rounds_ties_to_even():
    (fixed,) = multipliers(1, 33, 40)
    op = ops.IntMul((0.05, 0.02), 0.01, fixed)
    check(op, int8((2, 8, 4, 4)), int8((2, 8, 1, 1)))  # squeeze-and-excitation: x * scale per channel
    half = ops.IntMul((1.0, 1.0), 2.0, FixedPointMultiplier(2**30, 31))
    products = torch.tensor([1, 3, 5, -1, -3, 127], dtype=torch.int8)
    assert half(products, torch.tensor([1], dtype=torch.int8)).tolist() == [0, 2, 2, 0, -2, 64]
    assert half(torch.tensor([-128, 127], dtype=torch.int8), torch.tensor([-128, -128], dtype=torch.int8)).tolist() == [127, -128]


MATMUL_CASES = [
    ((2, 3, 5, 4), (2, 3, 4, 5)),  # attention: q @ k^T per batch and head
    ((2, 3, 5, 5), (2, 3, 5, 4)),  # attention @ v
    ((3, 1, 5, 12), (4, 12, 7)),  # leading axes broadcast
    ((5, 12), (12, 5)),
    ((2, 5, 7), (2, 7, 3)),  # bmm
]


@pytest.mark.parametrize("shapes", MATMUL_CASES, ids=str)
def test_matmul_against_the_reference(shapes):
    left, right = int8(shapes[0]), int8(shapes[1])
    reduction = shapes[0][-1]
    # a sum of K products of random int8 values spreads over ~ 5461 * sqrt(K): many outputs saturate, many do not
    fixed = quantize_multiplier(200 / (5461 * reduction**0.5), what="matmul")
    op = ops.IntMatMul((0.05, 0.02), 0.01, reduction, fixed)
    out = check(op, left, right)
    assert out.shape == torch.matmul(left.float(), right.float()).shape
    assert (out == 127).any() and (out == -128).any() and ((out > -128) & (out < 127)).any()


def test_matmul_goldens_ties_to_even_and_saturation():
    """Factor 1/2 (M = 2**30, n = 31): the sums 1, 3, 5, -1, -3 are ties and round to even; +-2 * 128 * 128 / 2
    saturates."""
    half = ops.IntMatMul((1.0, 1.0), 2.0, 2, FixedPointMultiplier(2**30, 31))
    left = torch.tensor([[1, 0], [2, 1], [2, 3], [0, -1], [-1, -2], [-128, -128], [-128, 127]], dtype=torch.int8)
    right = torch.tensor([[1, -128], [1, -128]], dtype=torch.int8)
    assert half(left, right).tolist() == [[0, -64], [2, -128], [2, -128], [0, 64], [-2, 127], [-128, 127], [0, 64]]
    check(half, left, right)


def test_matmul_of_another_reduction_size_is_refused():
    op = ops.IntMatMul((1.0, 1.0), 1.0, 4, FixedPointMultiplier(2**30, 31))
    with pytest.raises(QuantizationError, match="matmul: the product is over 5 values but the model was converted for 4"):
        op(int8((2, 5)), int8((5, 2)))
