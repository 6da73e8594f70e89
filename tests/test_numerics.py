"""edgeq.numerics against the spec (docs/numerics.md) and the independent numpy reference."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from reference import quantize as reference_quantize
from reference import round_shift

from edgeq import numerics as nx
from edgeq.errors import QuantizationError
from edgeq.targets import Rounding, ScaleRule

RNG = np.random.default_rng(1234)


def test_quantize_multiplier_literal_goldens():
    assert nx.quantize_multiplier(1.0, what="t") == nx.FixedPointMultiplier(2**30, 30)
    assert nx.quantize_multiplier(0.5, what="t") == nx.FixedPointMultiplier(2**30, 31)
    assert nx.quantize_multiplier(0.75, what="t") == nx.FixedPointMultiplier(3 * 2**29, 31)
    # 0.1 = 0.8 * 2**-3: M = round(0.8 * 2**31) = 1717986918, n = 34
    assert nx.quantize_multiplier(0.1, what="t") == nx.FixedPointMultiplier(1717986918, 34)
    # just below 1: the 31-bit mantissa rounds up to 2**31, so the shift drops by one
    assert nx.quantize_multiplier(1 - 2**-40, what="t") == nx.FixedPointMultiplier(2**30, 30)


@pytest.mark.parametrize("exponent", range(-31, 31, 3))
def test_quantize_multiplier_precision(exponent):
    for _ in range(50):
        real = math.ldexp(RNG.uniform(0.5, 1.0), exponent)
        fp = nx.quantize_multiplier(real, what="t")
        assert 2**30 <= fp.multiplier < 2**31
        assert abs(fp.real - real) <= math.ldexp(1, -fp.shift - 1)


@pytest.mark.parametrize("real", [0.0, -1.0, float("inf"), float("nan"), 2.0**30, 2.0**-34])
def test_quantize_multiplier_rejects_out_of_range(real):
    with pytest.raises(QuantizationError, match="conv 'x'"):
        nx.quantize_multiplier(real, what="conv 'x'")


def test_shared_shift_multipliers():
    multipliers, shift = nx.quantize_multipliers([0.75, 0.1], what="add")
    assert shift == 31
    assert multipliers == [3 * 2**29, round(0.1 * 2**31)]
    with pytest.raises(QuantizationError, match="rounds to zero"):
        nx.quantize_multipliers([1.0, 2.0**-33], what="add")


def test_requantize_matches_reference_on_random_values():
    acc = RNG.integers(-(2**31), 2**31, size=20000, dtype=np.int64)
    multiplier = RNG.integers(2**30, 2**31, size=20000, dtype=np.int64)
    shift = RNG.integers(1, 63, size=20000, dtype=np.int64)
    got = nx.requantize(torch.from_numpy(acc), torch.from_numpy(multiplier), torch.from_numpy(shift))
    np.testing.assert_array_equal(got.numpy(), round_shift(acc, multiplier, shift))


def test_requantize_rounds_ties_to_even():
    # M * 2**-n = 0.5: odd accumulators land exactly on .5
    acc = torch.tensor([-5, -3, -1, 1, 3, 5, 7], dtype=torch.int64)
    got = nx.requantize(acc, 2**30, 31)
    np.testing.assert_array_equal(got.numpy(), [-2, -2, 0, 0, 2, 2, 4])
    # 0.75 * [2, 6, -2] = [1.5, 4.5, -1.5]: ties; 0.75 * 5 = 3.75 is not
    np.testing.assert_array_equal(nx.requantize(torch.tensor([2, 6, -2, 5]), 3 * 2**29, 31).numpy(), [2, 4, -2, 4])


def test_power_of_two_requantization_is_a_rounding_shift():
    acc = torch.from_numpy(RNG.integers(-(2**31), 2**31, size=5000, dtype=np.int64))
    for k in range(1, 20):
        fp = nx.quantize_multiplier(2.0**-k, what="t")
        assert fp.multiplier == 2**30
        np.testing.assert_array_equal(nx.requantize(acc, fp.multiplier, fp.shift).numpy(), nx.rounding_right_shift(acc, k).numpy())


def test_quantize_rounds_half_to_even_and_saturates():
    values = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 200.0, -200.0, 127.4, -128.6])
    np.testing.assert_array_equal(nx.quantize(values, 1.0).numpy(), [0, 2, 2, 0, -2, -2, 127, -128, 127, -128])
    random = torch.from_numpy(RNG.normal(0, 3, size=10000).astype(np.float32))
    for scale in (1 / 128, 0.0371, 0.1):
        np.testing.assert_array_equal(nx.quantize(random, scale).numpy(), reference_quantize(random.numpy(), scale))


def test_dequantize_is_a_float32_product():
    q = torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8)
    np.testing.assert_array_equal(nx.dequantize(q, 0.1).numpy(), q.numpy().astype(np.float32) * np.float32(0.1))


def test_scale_from_amax_rules():
    amax = torch.tensor([127.0, 1.0, 0.0, 3.0])
    np.testing.assert_array_equal(
        nx.scale_from_amax(amax, 127, ScaleRule.ANY).numpy(),
        np.array([1.0, 1 / 127, nx.SCALE_FLOOR, 3 / 127], dtype=np.float32),
    )
    pow2 = nx.scale_from_amax(amax, 127, ScaleRule.POWER_OF_TWO).numpy()
    np.testing.assert_array_equal(pow2, np.array([1.0, 2.0**-6, 2.0**-23, 2.0**-5], dtype=np.float32))
    assert all(nx.is_power_of_two(float(s)) for s in pow2)
    assert not nx.is_power_of_two(0.1)


def test_weight_quantization_equals_aten_fake_quantize():
    weight = torch.from_numpy(RNG.normal(0, 1, size=(32, 64)).astype(np.float32))
    scales = weight.abs().amax(dim=1) / 127
    weight[0, :4] = torch.tensor([0.5, 1.5, -0.5, 2.5]) * scales[0]  # ties
    fake = torch.fake_quantize_per_channel_affine(weight, scales, torch.zeros(32, dtype=torch.int32), 0, -127, 127)
    q = nx.quantize_weight(weight, scales)
    np.testing.assert_array_equal((q.to(torch.float32) * scales[:, None]).numpy(), fake.numpy())


def test_bias_quantization_and_overflow():
    scales = nx.bias_scales(0.5, [0.25, 0.125])
    assert scales == [0.125, 0.0625]
    np.testing.assert_array_equal(nx.quantize_bias(torch.tensor([1.0, -0.09375]), scales, what="c").numpy(), [8, -2])
    with pytest.raises(QuantizationError, match=r"conv 'c': bias of channel 1 is inf, which is inf steps"):
        nx.quantize_bias(torch.tensor([0.0, float("inf")]), scales, what="conv 'c'")
    with pytest.raises(QuantizationError, match=r"conv 'c': bias of channel 0 is 1e\+18, which is 8e\+18 steps .* below 2\*\*62"):
        nx.quantize_bias(torch.tensor([1e18, 0.0]), scales, what="conv 'c'")


def test_a_bias_beyond_int32_is_rounded_at_a_power_of_two_multiple_of_its_scale():
    # 2**31 + 3 steps: at 2 * s, round_half_to_even(1073741825.5) = 1073741826, so 2147483652; 2**33 + 5 steps at
    # 8 * s: round(1073741824.625) * 8; -(2**31 - 1) steps fits int32 as it is
    scales = [1.0, 1.0, 1.0, 0.5]
    bias = torch.tensor([2.0**31 + 3, 2.0**33 + 5, -(2.0**31 - 1), 1.0], dtype=torch.float64)
    wide = nx.quantize_bias(bias, scales, what="c")
    assert wide.dtype == torch.int64
    np.testing.assert_array_equal(wide.numpy(), [2147483652, 8589934600, -(2**31 - 1), 2])
    np.testing.assert_array_equal(nx.bias_exponents(wide), [1, 3, 0, 0])
    with pytest.raises(QuantizationError, match="not a multiple of 2"):
        nx.bias_exponents(np.array([2**31 + 1]))


def test_accumulator_bound():
    nx.check_accumulator_bound(4608, torch.tensor([10**6], dtype=torch.int32), what="c")
    with pytest.raises(QuantizationError, match="int32 accumulator may overflow; got 200000 products"):
        nx.check_accumulator_bound(200000, None, what="c")


def test_relu6_ceiling():
    assert nx.relu6_ceiling(6 / 127) == 127
    assert nx.relu6_ceiling(2.0**-4) == 96
    assert nx.relu6_ceiling(0.1) == 60


def test_bias_at_accumulator_scale():
    scales = nx.bias_scales(0.5, [0.25, 0.125])
    assert nx.bias_at_accumulator_scale(scales, 0.5, [0.25, 0.125])
    assert nx.bias_at_accumulator_scale([0.125], 0.5, [0.25])
    assert nx.bias_at_accumulator_scale([s * (1 + 1e-7) for s in scales], 0.5, [0.25, 0.125])
    assert not nx.bias_at_accumulator_scale([s * 2 for s in scales], 0.5, [0.25, 0.125])
    assert not nx.bias_at_accumulator_scale([0.125, 0.0625, 0.1], 0.5, [0.25, 0.125])


def test_a_zero_bias_joins_the_accumulator_at_any_scale():
    zeros, ones = np.zeros(2, np.int32), np.array([0, 1], np.int32)
    assert nx.bias_joins_accumulator(zeros, [7.0], 0.5, [0.25, 0.125])
    assert not nx.bias_joins_accumulator(ones, [7.0], 0.5, [0.25, 0.125])
    assert nx.bias_joins_accumulator(ones, [0.125, 0.0625], 0.5, [0.25, 0.125])


def test_a_bias_at_a_power_of_two_multiple_of_the_accumulator_scale_means_its_integers_times_it():
    values = np.array([3, -5], np.int32)
    np.testing.assert_array_equal(nx.accumulator_bias(values, [0.125, 0.0625], 0.5, [0.25, 0.125]), [3, -5])
    np.testing.assert_array_equal(nx.accumulator_bias(values, [0.125 * 2**3, 0.0625], 0.5, [0.25, 0.125]), [24, -5])
    assert nx.accumulator_bias(values, [0.125 * 3, 0.0625], 0.5, [0.25, 0.125]) is None
    assert nx.accumulator_bias(values, [0.125 / 2, 0.0625], 0.5, [0.25, 0.125]) is None
    assert nx.accumulator_bias(values, [-0.125, 0.0625], 0.5, [0.25, 0.125]) is None


def test_a_bias_of_per_tensor_weights_has_one_accumulator_scale_for_every_channel():
    """ONNX Runtime's per-tensor files: one weight scale, one bias integer per output channel."""
    values = np.array([3, -5, 7], np.int32)
    np.testing.assert_array_equal(nx.accumulator_bias(values, [0.125], 0.5, [0.25]), [3, -5, 7])
    assert nx.bias_joins_accumulator(values, [0.125], 0.5, [0.25])
    assert not nx.bias_joins_accumulator(values, [0.125 * 3], 0.5, [0.25])


def _exact_round(value: Fraction, rounding: Rounding) -> int:
    floor = math.floor(value)
    rest = value - floor
    tie_up = rounding is Rounding.HALF_UP or floor % 2 == 1
    return floor + int(rest > Fraction(1, 2) or (rest == Fraction(1, 2) and tie_up))


@pytest.mark.parametrize("rounding", list(Rounding))
def test_requantize_of_a_wide_accumulator_is_the_exact_rounding(rounding):
    # accumulators past 2**31 (an int64 accumulator) with M near 2**31: acc * M passes int64; ties included
    multiplier, shift = 2**31 - 1, 45
    accs = [2**40 + 2**14, -(2**40) - 2**14, 3 * 2**38 + 1, 2**31, -(2**31) - 7, 5 * 2**44]
    got = nx.split_requantize(torch.tensor(accs, dtype=torch.int64), multiplier, shift, rounding).tolist()
    expected = [_exact_round(Fraction(a * multiplier, 2**shift), rounding) for a in accs]
    assert got == expected
    tie = 2**44  # (2**44 * M) / 2**45 = M / 2: a tie between (M - 1) / 2 and (M + 1) / 2
    rounded = nx.split_requantize(torch.tensor([tie, -tie]), multiplier, shift, rounding).tolist()
    assert rounded == ([2**30, -(2**30 - 1)] if rounding is Rounding.HALF_UP else [2**30, -(2**30)])
    small = torch.tensor([5, -7, 2**30 + 3], dtype=torch.int64)  # int32-range accumulators: the same as requantize
    assert nx.split_requantize(small, multiplier, 31, rounding).tolist() == nx.requantize(small, multiplier, 31, rounding).tolist()


def test_the_split_requantization_is_proved_from_the_accumulator_bound():
    multipliers = [nx.FixedPointMultiplier(2**31 - 1, 45)]
    nx.check_split_requantization([2**60], multipliers, what="c")  # (2**29 + 1) * M < 2**61
    with pytest.raises(QuantizationError, match=r"^conv 'c': int64 accumulator up to 4611686018427387904 times multiplier"):
        nx.check_split_requantization([2**62], multipliers, what="conv 'c'")


def test_accumulator_bounds_literal():
    weights = np.array([[1, -2, 0], [-127, 127, 3]], dtype=np.int8)
    assert nx.accumulator_bounds(weights, np.array([5, -6]), axis=0) == [128 * 3 + 5, 128 * 257 + 6]
    assert nx.accumulator_bounds(weights.T, None, axis=1) == [128 * 3, 128 * 257]


def test_zero_point_bounds_and_bias_literal():
    """docs/numerics.md section 9: |q - z| <= max(128 + z, 127 - z); b' = b - z * Σw; int64 past int32."""
    weights = np.array([[1, -2, 0], [-127, 127, 3]], dtype=np.int8)
    assert nx.largest_input_magnitude(-128) == 255 and nx.largest_input_magnitude(100) == 228
    assert nx.accumulator_bounds(weights, np.array([5, -6]), axis=0, input_zero_point=-128) == [255 * 3 + 5, 255 * 257 + 6]
    assert nx.folded_bias(np.array([5, -6]), weights, 0, -128).tolist() == [5 + 128 * -1, -6 + 128 * 3]
    bounds = nx.accumulator_bounds(np.full((1, 9), 127, np.int8), np.array([2**31 - 1 - 255 * 1143]), 0, -128)
    assert bounds == [2**31 - 1] and not nx.needs_int64_accumulator(bounds) and nx.needs_int64_accumulator([2**31])
    assert nx.int8_zero_point("uint8", 128) == 0 and nx.int8_zero_point("int8", 3) == 3


def test_tiny_multiplier_is_zero_where_the_bound_proves_it():
    """GoogLeNet's classifier as ONNX Runtime quantizes it: m = 1.3e-11 needs shift 67."""
    with pytest.raises(QuantizationError, match="needs shift 67"):
        nx.quantize_multiplier(1.3e-11, what="fc")
    zero = nx.quantize_multiplier(1.3e-11, what="fc", accumulator_bound=2**31 - 1)
    assert (zero.multiplier, zero.shift) == (0, 62)
    acc = torch.tensor([-(2**31) + 1, -1, 0, 1, 2**31 - 1], dtype=torch.int64)
    assert nx.requantize(acc, zero.multiplier, zero.shift).tolist() == [0, 0, 0, 0, 0]
    # exactly half a step is not below one half: not proven, an error
    with pytest.raises(QuantizationError, match="can reach half a step"):
        nx.quantize_multiplier(2.0**-40, what="fc", accumulator_bound=2**39)
    assert nx.quantize_multiplier(2.0**-40, what="fc", accumulator_bound=2**39 - 1).multiplier == 0
    # in range: the usual multiplier, bound or not; too large: still an error
    assert nx.quantize_multiplier(0.1, what="fc", accumulator_bound=100) == nx.quantize_multiplier(0.1, what="fc")
    with pytest.raises(QuantizationError, match="needs shift"):
        nx.quantize_multiplier(2.0**31, what="fc", accumulator_bound=1)


def test_conv_multipliers_use_each_channels_bound():
    multipliers = nx.conv_multipliers(1 / 128, [1e-12, 0.01], 1.0, what="fc", bounds=[2**20, 2**20])
    assert multipliers[0].multiplier == 0 and multipliers[1] == nx.quantize_multiplier(0.01 / 128, what="fc")


def test_product_accumulator_bound_of_a_matmul():
    """docs/numerics.md "Matrix product": K * 128 * 128 <= 2**31 - 1, that is K <= 131071; with zero points the
    largest |q - z| of each input replaces 128."""
    assert nx.product_accumulator_bound(12) == 12 * 2**14 and nx.product_accumulator_bound() == 2**14
    assert nx.product_accumulator_bound(3, (-128, 0)) == 3 * 255 * 128
    nx.check_product_accumulator_bound(131071, what="matmul 'attn'")
    with pytest.raises(QuantizationError, match=r"^matmul 'attn': int32 accumulator may overflow; got 131072 products .* "
                       r"bound 2147483648 \(allowed: <= 2147483647, that is at most 131071 products\)"):
        nx.check_product_accumulator_bound(131072, what="matmul 'attn'")
    with pytest.raises(QuantizationError, match="at most 33025 products"):
        nx.check_product_accumulator_bound(33026, (-128, -128), what="matmul")


def test_product_multiplier_bound_grows_with_the_reduction():
    """A factor below 2**-32 is 0 only where K * 2**14 * m < 1/2 proves it: a matmul's sum reaches further than one
    product."""
    assert nx.product_multiplier((2.0**-20, 2.0**-20), 1.0, what="mul").multiplier == 0  # 2**14 * 2**-40 < 1/2
    assert nx.product_multiplier((2.0**-20, 2.0**-20), 1.0, what="matmul", reduction_size=2**25 - 1).multiplier == 0
    with pytest.raises(QuantizationError, match="matmul: requantization multiplier .* can reach half a step"):
        nx.product_multiplier((2.0**-20, 2.0**-20), 1.0, what="matmul", reduction_size=2**25)
