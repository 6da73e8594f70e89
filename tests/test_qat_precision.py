"""Fake quantization against the integer model's rounding, under torch.autocast and on any device.

What is exact (docs/training.md "Devices and mixed precision"): aten's fused kernel equals ``round(x / s)`` for
power-of-two scales only, so a QuantStub (where the integer model quantizes floats) fake quantizes by division,
bit for bit; fake quantization computes in float32 under autocast, observers keep float32 ranges, and convert_fx
gives the same integer model inside autocast as outside.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import SmallCNN

from edgeq.numerics import quantize, round_half
from edgeq.quantization import (
    DeQuantStub,
    FakeQuantState,
    QuantStub,
    calibrate,
    convert_fx,
    default_calib_qconfig,
    prepare_qat_fx,
    set_fake_quantize,
)
from edgeq.quantization.fake_quantize import ActivationFakeQuantize, fake_quantize, fake_quantize_weight, weight_scales
from edgeq.quantization.observers import EMAMinMaxObserver, Observer
from edgeq.quantization.qat_modules import Activation
from edgeq.targets import Rounding, ScaleRule

STEPS = torch.arange(-130, 130, dtype=torch.float32)


def _near_ties(scale: float) -> torch.Tensor:
    """Every tie ``(k + 1/2) * s`` of the int8 range and its float32 neighbours."""
    ties = (STEPS + 0.5) * scale
    return torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])


def _aten(value: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(value, torch.tensor([scale]), torch.zeros((), dtype=torch.int32), -128, 127)


def _rule(value: torch.Tensor, scale: float, rounding: Rounding = Rounding.HALF_TO_EVEN) -> torch.Tensor:
    return torch.clamp(round_half(value / torch.tensor(scale), rounding), -128, 127) * scale


@pytest.mark.parametrize("scale", [2.0**-7, 2.0**-3, 2.0**2])
def test_aten_kernel_is_the_rule_for_power_of_two_scales(scale):
    values = _near_ties(scale)
    np.testing.assert_array_equal(_aten(values, scale).numpy(), _rule(values, scale).numpy())


def _wide(scale: float, *shape: int) -> torch.Tensor:
    """Values from far below to far above the int8 range at ``scale``, ties and their neighbours, and infinities."""
    generator = torch.Generator().manual_seed(7)
    spread = torch.randn(*shape, generator=generator) * 100 * scale
    ties = _near_ties(scale)
    flat = spread.flatten()
    flat[: ties.numel()] = ties[: flat.numel()]
    flat[-2:] = torch.tensor([float("inf"), float("-inf")])
    return flat.reshape(shape)


@pytest.mark.parametrize("scale", [2.0**-7, 0.0234, 3.3])
def test_activation_fake_quantize_is_atens_kernel(scale):
    """edgeq's fake quantization (vectorized ops, docs/training.md "Speed of the QAT step") equals aten's fused
    per-tensor kernel bit for bit on a half-to-even target, values and straight-through gradients, saturation and
    ties included."""
    quantizer = ActivationFakeQuantize(None, ScaleRule.ANY, fixed_scale=scale)
    values = _wide(scale, 4, 3, 60).requires_grad_()
    reference = values.detach().clone().requires_grad_()
    upstream = torch.randn(values.shape, generator=torch.Generator().manual_seed(1))
    quantizer(values).backward(upstream)
    _aten(reference, scale).backward(upstream)
    np.testing.assert_array_equal(quantizer(values).detach().numpy(), _aten(reference, scale).detach().numpy())
    np.testing.assert_array_equal(values.grad.numpy(), reference.grad.numpy())
    assert (values.grad == 0).any() and (values.grad == upstream).any()


@pytest.mark.parametrize("qmin, qmax", [(-128, 127), (-127, 127), (-128, 126), (-127, 126)])
def test_fake_quantize_gradient_bounds_at_ties(qmin, qmax):
    """The backward's bounds on ``x * (1/s)`` (a tie at ``qmin - 1/2`` or ``qmax + 1/2`` rounds into the range when
    the bound is even) give aten's gradient at every tie of the range and its neighbours."""
    values = _near_ties(0.0234).requires_grad_()
    reference = values.detach().clone().requires_grad_()
    fake_quantize(values, torch.tensor(0.0234), qmin, qmax, Rounding.HALF_TO_EVEN, False).sum().backward()
    torch.fake_quantize_per_tensor_affine(reference, torch.tensor([0.0234]), torch.zeros((), dtype=torch.int32), qmin, qmax).sum().backward()
    np.testing.assert_array_equal(values.grad.numpy(), reference.grad.numpy())


@pytest.mark.parametrize("activation", [Activation.RELU, Activation.RELU6])
def test_activation_fused_into_fake_quantization(activation):
    """A ReLU / ReLU6 fused into its output quantizer (``clamp_and_quantize``) equals the in-place activation then
    the quantizer bit for bit: values, gradients and the range observed, at the clamp's bounds, ties, saturation
    and infinities, in QAT (observing) and in validation."""
    scale = 0.0234
    quantizers = [ActivationFakeQuantize(EMAMinMaxObserver(), ScaleRule.ANY) for _ in range(2)]
    edges = torch.tensor([0.0, -0.0, 6.0, 6.0 - 2**-21, 6.0 + 2**-21, -(2**-30), 2**-30])
    values = torch.cat([_wide(scale, 600), edges, _near_ties(scale) + 3.0])
    upstream = torch.randn(values.shape, generator=torch.Generator().manual_seed(2))
    for state in (FakeQuantState.QAT, FakeQuantState.VALIDATION):
        inputs = [values.clone().requires_grad_() for _ in range(2)]
        for quantizer in quantizers:
            quantizer.set_fake_quant_state(state)
        fresh = [x * 1.0 for x in inputs]  # a fresh result, which the in-place activation may overwrite
        assert quantizers[0].fuses_clamp(fresh[0])
        fused = quantizers[0].clamp_and_quantize(fresh[0], activation.bounds)
        plain = quantizers[1](activation(fresh[1], inplace=True))
        fused.backward(upstream)
        plain.backward(upstream)
        np.testing.assert_array_equal(fused.detach().numpy(), plain.detach().numpy())
        np.testing.assert_array_equal(inputs[0].grad.numpy(), inputs[1].grad.numpy())
        assert (inputs[0].grad == 0).any() and (inputs[0].grad == upstream).any()
        np.testing.assert_array_equal(quantizers[0].observer.running_max.numpy(), quantizers[1].observer.running_max.numpy())


def test_per_channel_fake_quantize_is_atens_per_channel_kernel():
    """Fake quantization per channel equals aten's ``fake_quantize_per_channel_affine`` bit for bit, values and
    gradients, at any scales (saturating ones too)."""
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(6, 3, 3, 3, generator=generator) * torch.logspace(-3, 1, 6).reshape(-1, 1, 1, 1)).requires_grad_()
    scales = weight_scales(weight, ScaleRule.ANY) * torch.tensor([1.0, 0.5, 0.013, 1.7, 0.25, 0.999])
    reference = weight.detach().clone().requires_grad_()
    upstream = torch.randn(weight.shape, generator=generator)
    fake = fake_quantize(weight, scales.reshape(-1, 1, 1, 1), -127, 127, Rounding.HALF_TO_EVEN, False)
    aten = torch.fake_quantize_per_channel_affine(reference, scales, torch.zeros(6, dtype=torch.int32), 0, -127, 127)
    fake.backward(upstream)
    aten.backward(upstream)
    np.testing.assert_array_equal(fake.detach().numpy(), aten.detach().numpy())
    np.testing.assert_array_equal(weight.grad.numpy(), reference.grad.numpy())
    assert (weight.grad == 0).any()


@pytest.mark.parametrize("rule", list(ScaleRule))
def test_weight_fake_quantize_at_its_own_scales_is_atens_kernel(rule):
    """A weight fake-quantized at its own scales (rounded without a clamp or a mask: nothing saturates there) equals
    aten's per-channel kernel at those scales bit for bit, values and gradients: channels of every magnitude, one
    of zeros, one below the scale floor."""
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(8, 4, 3, 3, generator=generator) * torch.logspace(-6, 3, 8).reshape(-1, 1, 1, 1)
    weight[2] = 0.0
    weight[3] = 1e-9
    weight = weight.requires_grad_()
    reference = weight.detach().clone().requires_grad_()
    upstream = torch.randn(weight.shape, generator=generator)
    fake = fake_quantize_weight(weight, rule)
    scales = weight_scales(reference, rule)
    aten = torch.fake_quantize_per_channel_affine(reference, scales, torch.zeros(8, dtype=torch.int32), 0, -127, 127)
    fake.backward(upstream)
    aten.backward(upstream)
    np.testing.assert_array_equal(fake.detach().numpy(), aten.detach().numpy())
    np.testing.assert_array_equal(weight.grad.numpy(), reference.grad.numpy())
    steps = torch.round(fake.detach() / scales.reshape(-1, 1, 1, 1)).abs().amax(dim=(1, 2, 3))
    assert steps.max() == 127 if rule is ScaleRule.ANY else steps.max() <= 127  # the largest values at the edge


def test_aten_kernel_is_not_the_rule_for_other_scales():
    """Why a QuantStub does not use aten's kernel: ``x * (1/s)`` rounds differently from ``x / s`` near ties."""
    values = _near_ties(0.0234)
    assert (_aten(values, 0.0234) != _rule(values, 0.0234)).any()


@pytest.mark.parametrize("rounding", list(Rounding))
def test_float_input_fake_quantizes_as_the_integer_model(rounding):
    quantizer = ActivationFakeQuantize(None, ScaleRule.ANY, fixed_scale=0.0234, rounding=rounding, quantizes_float=True)
    values = _near_ties(0.0234).requires_grad_()
    fake = quantizer(values)
    steps = quantize(values.detach(), quantizer.scale(), rounding).to(torch.float32)
    np.testing.assert_array_equal(fake.detach().numpy(), (steps * quantizer.scale()).numpy())  # dequantize(quantize(x))
    fake.sum().backward()  # straight through inside the range, 0 where it saturates
    unsaturated = round_half(values.detach() / torch.tensor(0.0234), rounding)
    np.testing.assert_array_equal(values.grad.numpy(), ((unsaturated >= -128) & (unsaturated <= 127)).float().numpy())


def test_quant_stub_of_a_prepared_model_is_the_integer_quantize():
    """An observed (not power-of-two) QuantStub scale on npu-m: the calibrated model's first fake quantization is
    the integer model's quantize, tie for tie."""
    model = torch.nn.Sequential(QuantStub(), torch.nn.Conv2d(1, 2, 1), DeQuantStub())
    probe = torch.randn(1, 1, 4, 4)
    calibrated = calibrate(model, [probe * 3], example_inputs=(probe,), target="npu-m")
    quantizer = calibrated.get_submodule("0").output_quantizer
    scale = quantizer.scale()
    values = _near_ties(scale).reshape(1, 1, -1, 3)
    integer = convert_fx(calibrated)
    first = next(m for m in integer.graph_module.modules() if type(m).__name__ == "IntQuantize")
    np.testing.assert_array_equal(calibrated.get_submodule("0")(values).numpy(), (first(values).to(torch.float32) * scale).numpy())


def _qat_model() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    images = torch.randn(8, 1, 12, 12)
    calibrated = calibrate(SmallCNN(), [images], example_inputs=(images[:1],), target="npu-m")
    qat = prepare_qat_fx(SmallCNN(), None, example_inputs=(images[:1],), target="npu-m").train()
    qat.load_state_dict(calibrated.state_dict())
    return qat


def test_autocast_bfloat16_keeps_the_integer_arithmetic():
    qat = _qat_model()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            images = torch.randn(8, 1, 12, 12, generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(qat(images).float(), torch.randint(0, 10, (8,), generator=generator)).backward()
            optimizer.step()
        quantizer = next(m for m in qat.modules() if isinstance(m, ActivationFakeQuantize) and m.observer is not None)
        bf16 = torch.randn(64, generator=generator).to(torch.bfloat16)
        set_fake_quantize(qat, FakeQuantState.VALIDATION)
        fake = quantizer(bf16)
        assert fake.dtype == torch.float32  # fake quantization computes in float32 whatever autocast says
        np.testing.assert_array_equal(fake.numpy(), quantizer(bf16.float()).numpy())
        inside = convert_fx(qat)
    for observer in (m for m in qat.modules() if isinstance(m, Observer)):
        assert observer.running_min.dtype == observer.running_max.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in qat.parameters())
    probe = torch.randn(4, 1, 12, 12, generator=generator)
    np.testing.assert_array_equal(inside.run_integer(probe).numpy(), convert_fx(qat).run_integer(probe).numpy())


def test_qat_step_reads_nothing_on_the_host(monkeypatch):
    """A QAT step (forward, backward, optimizer step) never turns a tensor into a Python value: on a GPU that
    would wait for the device once per quantizer. The first QAT batch (EMA observers without data) included."""
    torch.manual_seed(0)
    images = torch.randn(8, 1, 12, 12)
    qat = prepare_qat_fx(SmallCNN(), None, example_inputs=(images[:1],), target="npu-m").train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    labels = torch.randint(0, 10, (8,))

    def host_read(*_: object) -> None:
        raise AssertionError("a tensor was read on the host")

    for method in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(qat(images), labels).backward()
        optimizer.step()
    monkeypatch.undo()
    assert all(m.observer.has_data for m in qat.modules() if isinstance(m, ActivationFakeQuantize) and m.observer is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_calibration_qat_and_convert():
    """On a power-of-two target a CUDA calibration gives the CPU's integer model (ranges differ only by float
    rounding, which a power-of-two scale absorbs); a QAT step and convert run on the device."""
    torch.manual_seed(0)
    images = torch.randn(8, 1, 12, 12)
    model = SmallCNN().eval()
    on_cpu = calibrate(model, [images], example_inputs=(images[:1],), target="npu-s")
    prepared = prepare_qat_fx(model, default_calib_qconfig, example_inputs=(images[:1],), target="npu-s").eval().cuda()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        prepared(images.cuda())
    set_fake_quantize(prepared, FakeQuantState.QAT)
    expected = convert_fx(on_cpu).run_integer(images).numpy()
    np.testing.assert_array_equal(convert_fx(prepared).run_integer(images.cuda()).cpu().numpy(), expected)
    prepared.train()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    F.cross_entropy(prepared(images.cuda()), torch.zeros(8, dtype=torch.long, device="cuda")).backward()
    optimizer.step()
    assert convert_fx(prepared).run_integer(images.cuda()).shape == expected.shape
