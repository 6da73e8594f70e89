"""prepare_qat_fx / set_fake_quantize / convert_fx: the workflow, the states, the presets and the errors."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import (
    DIM,
    HEADS,
    TOKENS,
    AttentionBlock,
    BatchNorms1d,
    BilinearResizes,
    Clamps,
    DataMovement,
    EluBlock,
    FunctionalOps,
    GeluBlocks,
    Layers,
    Pads,
    SmallCNN,
    calibrate,
    integer_model,
    with_batchnorm_statistics,
)
from reference import clamp_levels, run_reference
from torch import nn

from edgeq.errors import QuantizationError, TraceError, UnsupportedOpError
from edgeq.numerics import is_power_of_two
from edgeq.quantization import (
    DeQuantStub,
    FakeQuantState,
    QConfig,
    QuantStub,
    convert_fx,
    default_calib_int32_output_qconfig,
    default_calib_qconfig,
    default_qat_int32_output_qconfig,
    default_qat_qconfig,
    prepare_qat_fx,
    set_fake_quantize,
)
from edgeq.quantization import calibrate as edgeq_calibrate
from edgeq.quantization import integer_ops as ops
from edgeq.quantization.observers import HistogramObserver, MinMaxObserver
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq.quantization.qat_modules import ConvAct2d, Requantizing


def digits_like(batch: int = 8) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8) * 2 - 1


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def assert_matches_reference(int_model, *inputs: torch.Tensor) -> None:
    got = as_tuple(int_model.run_integer(*inputs))
    expected = as_tuple(run_reference(int_model.graph_module, *(x.numpy() for x in inputs)))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.numpy(), e)


# ---- the integer model is the direct integer evaluation of its graph ------------------------------------------


@pytest.mark.parametrize("target", ["x86_64", "npu-m", "npu-s"])
def test_small_cnn_integer_model_equals_reference(target):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    int_model = integer_model(model, digits_like(), target)
    assert_matches_reference(int_model, digits_like(16))


@pytest.mark.parametrize("halves_listed", [False, True])  # torch.fx, torch.export
@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_linear_and_conv_are_recognised_by_their_computation(target, halves_listed):
    """F.linear and F.conv2d (timm's Linear, an nn.Conv2d subclass) are the integer ops nn.Linear and nn.Conv2d
    are, fused alike (conv + BatchNorm + ReLU), with bit-identical integers."""
    torch.manual_seed(0)
    plain = with_batchnorm_statistics(Layers(subclassed=False, halves_listed=halves_listed), (4, 3, 8, 8))
    subclassed = Layers(subclassed=True, halves_listed=halves_listed).eval()
    subclassed.load_state_dict(plain.state_dict())
    int_models = []
    for model in (plain, subclassed):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FloatFallbackWarning)
            int_models.append(integer_model(model, torch.randn(2, 3, 8, 8), target))
    kinds = [
        [type(m.graph_module.get_submodule(n.target)) for n in m.graph_module.graph.nodes if n.op == "call_module"]
        for m in int_models
    ]
    assert kinds[0] == kinds[1] and kinds[0].count(ops.IntConv2d) == 2 and ops.IntLinear in kinds[0]
    x = torch.randn(4, 3, 8, 8)
    np.testing.assert_array_equal(int_models[1].run_integer(x).numpy(), int_models[0].run_integer(x).numpy())
    assert_matches_reference(int_models[1], x)


@pytest.mark.parametrize("halves_listed", [False, True])  # torch.fx, torch.export
def test_data_movement_is_integer(halves_listed):
    """Window partitions, roll, unbind, narrow, split with sizes and constant indexing only move the integers."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        int_model = integer_model(DataMovement(halves_listed).eval(), torch.randn(2, 4, 8, 8), "npu-m")
    x = torch.randn(2, 4, 8, 8)  # the example's batch: torch.export's capture reads its sizes (docs/architecture.md)
    assert int_model.run_integer(x).shape == (2, 7, 20)
    assert_matches_reference(int_model, x)


@pytest.mark.parametrize("halves_listed", [False, True])  # torch.fx, torch.export
def test_pads_with_zeros_pad_the_integers_with_zeros(halves_listed):
    torch.manual_seed(0)
    model = Pads(halves_listed).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        int_model = integer_model(model, torch.randn(2, 4, 7, 7), "npu-m")
    x = torch.randn(3, 4, 7, 7)
    got = int_model.run_integer(x)
    assert got.shape == (3, 11, 4, 7)
    assert (got[:, :1] == 0).all() and (got[:, -2:] == 0).all() and (got[..., :2] == 0).all()
    assert_matches_reference(int_model, x)


@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_functional_ops_are_quantized(target):
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    int_model = integer_model(FunctionalOps().eval(), example, target)
    kinds = {type(m).__name__ for m in int_model.graph_module.modules()}
    assert {"IntAdd", "IntConcat", "IntClamp", "IntMaxPool2d", "IntAvgPool2d", "IntGlobalAvgPool2d"} <= kinds
    assert {"IntUpsampleNearest2d", "IntLinear", "IntConv2d"} <= kinds
    assert_matches_reference(int_model, torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("target", ["x86_64", "npu-m"])
def test_gelu_blocks_keep_gelu_in_integers(target):
    """ConvNeXt- and ViT-style GELU blocks quantize with strict=True (nothing left in float): both GELU forms are
    lookup tables, and the integer model equals the reference."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 16, 16)
    prepare_qat_fx(GeluBlocks().eval(), example_inputs=(example,), target=target, strict=True)
    int_model = integer_model(GeluBlocks().eval(), example, target)
    tables = [m.op.value for m in int_model.graph_module.modules() if isinstance(m, ops.IntLookupTable)]
    assert tables == ["gelu", "gelu_tanh"]
    assert_matches_reference(int_model, torch.randn(3, 3, 16, 16))


@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_elu_is_a_lookup_table(target):
    """nn.ELU and F.elu (alpha as set) quantize with strict=True as tables, and the integer model equals the
    reference."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    prepare_qat_fx(EluBlock().eval(), example_inputs=(example,), target=target, strict=True)
    int_model = integer_model(EluBlock().eval(), example, target)
    tables = [(m.op.value, m.alpha) for m in int_model.graph_module.modules() if isinstance(m, ops.IntLookupTable)]
    assert tables == [("elu", 1.0), ("elu", 0.5)]
    assert_matches_reference(int_model, torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_hardtanh_and_clamps_are_integer_clamps(target):
    """Hardtanh and clamps of constant bounds are relu's integer clamp at their input's scale, each bound quantized
    as ReLU6's ceiling; ``clamp(min=0)`` fuses into its conv as a ReLU, ``clamp(0, 6)`` is a ReLU6."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    prepared = prepare_qat_fx(Clamps().eval(), example_inputs=(example,), target=target, strict=True)
    modules = dict(prepared.named_modules())
    assert modules["conv3"].activation.value == "relu"
    int_model = integer_model(Clamps().eval(), example, target)
    graph = int_model.graph_module
    clamps = [node for node in graph.graph.nodes if isinstance(getattr(graph, str(node.target), None), ops.IntClamp)]
    bounds = [(-1, 1), (-0.3, 0.7), (-0.2, math.inf), (-math.inf, 0.5), (-2.5, 0.9), (0, 6)]
    assert len(clamps) == len(bounds)
    for node, real in zip(clamps, bounds):
        clamp, (scale,) = getattr(graph, node.target), int_model.tensor_quant[node.args[0].name].scales
        assert (clamp.low, clamp.high) == clamp_levels(real, scale), node.name
    assert_matches_reference(int_model, torch.randn(3, 3, 8, 8))


def test_clamp_to_a_tensor_is_unsupported():
    with pytest.raises(UnsupportedOpError, match="clamp to tensor bounds"):
        _prepare(_ClampToTensor())


class _ClampToTensor(nn.Module):
    def forward(self, x):
        return torch.clamp(x, max=torch.sigmoid(x))


@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_bilinear_resizes_are_integer(target):
    """F.interpolate, nn.Upsample and nn.UpsamplingBilinear2d in bilinear mode (sizes, factors, align_corners both
    ways, down) quantize with strict=True, and the integer model equals the reference."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 7, 6)
    prepare_qat_fx(BilinearResizes().eval(), example_inputs=(example,), target=target, strict=True)
    int_model = integer_model(BilinearResizes().eval(), example, target)
    resizes = [m for m in int_model.graph_module.modules() if isinstance(m, ops.IntUpsampleBilinear2d)]
    assert [(m.size, m.align_corners) for m in resizes] == [
        ((13, 11), False), ((26, 22), False), ((52, 44), True), ((5, 7), True), ((6, 4), False), ((9, 6), False)
    ]
    assert_matches_reference(int_model, torch.randn(3, 3, 7, 6))


@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_attention_products_are_integer(target):
    """A ViT-like attention block: both matmuls of two activations are integer ops (the head scale and the softmax
    between them stay float), and the integer model equals the reference."""
    torch.manual_seed(0)
    example = torch.randn(2, TOKENS, DIM)
    with pytest.warns(FloatFallbackWarning):
        int_model = integer_model(AttentionBlock().eval(), example, target)
    products = [m for m in int_model.graph_module.modules() if isinstance(m, ops.IntMatMul)]
    assert [m.reduction_size for m in products] == [DIM // HEADS, TOKENS]
    assert_matches_reference(int_model, torch.randn(3, TOKENS, DIM))


def test_integer_model_tracks_fake_quantized_model():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    prepared = calibrate(model, digits_like(), "npu-m", digits_like)
    x = digits_like(64)
    fake = prepared(x)
    int_model = convert_fx(prepared)
    real = int_model(x)
    step = int_model.output_quant()[0].scale
    # the same grid, up to rounding of multipliers, biases and ties: a few output steps at most
    assert torch.max(torch.abs(fake - real)) <= 3 * step
    assert torch.equal(fake.argmax(1), real.argmax(1)) or (fake.argmax(1) != real.argmax(1)).float().mean() < 0.05
    assert torch.max(torch.abs(model(x) - real)) < 0.1 * model(x).abs().max()


def test_float_and_raw_int8_inputs_agree():
    torch.manual_seed(0)
    int_model = integer_model(SmallCNN().eval(), digits_like(), "npu-s")
    pixels = torch.randint(0, 256, (4, 1, 8, 8))
    normalised = (pixels.float() - 128) / 128
    raw = (pixels - 128).to(torch.int8)
    assert torch.equal(int_model.run_integer(normalised), int_model.run_integer(raw))


# ---- fixed-scale QuantStub ------------------------------------------------------------------------------------


def test_fixed_scale_stub_survives_calibration_qat_and_convert():
    torch.manual_seed(0)
    model = SmallCNN()
    calib = calibrate(model.eval(), digits_like(), "npu-m", lambda: digits_like() * 3)
    assert calib.quant.output_quantizer.scale() == 1 / 128
    qat = prepare_qat_fx(model.train(), default_qat_qconfig, example_inputs=(digits_like(),), target="npu-m")
    qat.load_state_dict(calib.state_dict())
    set_fake_quantize(qat, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(3):
        loss = F.cross_entropy(qat(digits_like() * 5), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert qat.quant.output_quantizer.scale() == 1 / 128
    int_model = convert_fx(qat)
    assert int_model.graph_module.quant.output_scale == 1 / 128
    assert int_model.tensor_quant["quant"].scales == (1 / 128,)


def test_fixed_scale_must_be_power_of_two_on_npu_s():
    class Model(SmallCNN):
        def __init__(self):
            super().__init__()
            self.quant = QuantStub(scale=0.01)

    with pytest.raises(QuantizationError, match=r"QuantStub 'quant': fixed scale 0.01 is not a power of two"):
        prepare_qat_fx(Model(), example_inputs=(digits_like(),), target="npu-s")
    with pytest.raises(QuantizationError, match="positive finite"):
        QuantStub(scale=-1.0)


# ---- states -----------------------------------------------------------------------------------------------------


def _quantizers(model):
    return {name: m.output_quantizer for name, m in model.named_modules() if isinstance(m, Requantizing) and m.output_quantizer is not None}


def _ranges(model):
    return {name: q.observer.clipping_range() for name, q in _quantizers(model).items() if q.observer is not None}


def _on_grid(values: torch.Tensor, scale: float) -> bool:
    steps = values / scale
    return bool(torch.all(torch.abs(steps - torch.round(steps)) < 1e-3))


def test_calibration_observes_without_fake_quantizing():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    prepared = prepare_qat_fx(model, default_calib_qconfig, example_inputs=(digits_like(),), target="npu-m").eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    x = digits_like()
    out = prepared(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)  # float arithmetic, BN folded differently
    assert all(q.observer.has_data for q in _quantizers(prepared).values() if q.observer is not None)


def test_qat_state_trains_observers_and_fake_quantizes():
    torch.manual_seed(0)
    prepared = prepare_qat_fx(SmallCNN().train(), example_inputs=(digits_like(),), target="npu-m")
    set_fake_quantize(prepared, FakeQuantState.QAT)
    prepared(digits_like())
    before = _ranges(prepared)
    bn_mean = prepared.conv1.bn.running_mean.clone()
    out = prepared(digits_like() * 2)
    assert _ranges(prepared) != before
    assert not torch.equal(prepared.conv1.bn.running_mean, bn_mean)  # BatchNorm statistics keep updating
    assert _on_grid(out, prepared.fc.output_quantizer.scale())
    F.cross_entropy(out, torch.randint(0, 10, (8,))).backward()
    assert prepared.conv1.weight.grad is not None and prepared.conv1.weight.grad.abs().sum() > 0
    assert prepared.conv1.bn.weight.grad is not None


def test_validation_freezes_ranges():
    torch.manual_seed(0)
    prepared = calibrate(SmallCNN().eval(), digits_like(), "npu-m", digits_like)
    before = _ranges(prepared)
    out = prepared(digits_like() * 10)
    assert _ranges(prepared) == before
    assert _on_grid(out, prepared.fc.output_quantizer.scale())


def test_set_fake_quantize_needs_a_prepared_model():
    with pytest.raises(QuantizationError, match="prepare it with prepare_qat_fx first"):
        set_fake_quantize(nn.Linear(2, 2), FakeQuantState.QAT)


def test_calibration_checkpoint_loads_into_qat_model():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    calib = calibrate(model, digits_like(), "npu-m", digits_like)
    qat = prepare_qat_fx(model, default_qat_qconfig, example_inputs=(digits_like(),), target="npu-m")
    qat.load_state_dict(calib.state_dict())  # strict: same keys
    set_fake_quantize(qat, FakeQuantState.VALIDATION)
    qat.eval()
    x = digits_like()
    torch.testing.assert_close(qat(x), calib(x), rtol=0, atol=0)


def test_prepare_does_not_modify_the_float_model():
    model = SmallCNN().eval()
    state = copy.deepcopy(model.state_dict())
    prepare_qat_fx(model, example_inputs=(digits_like(),), target="npu-s")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert isinstance(model.conv1, nn.Conv2d)


# ---- qconfig forms and presets --------------------------------------------------------------------------------


def test_int32_output_preset_via_module_name_dict():
    torch.manual_seed(0)
    qconfig = {"": default_calib_qconfig, "module_name": {"fc": default_calib_int32_output_qconfig}}
    prepared = calibrate(SmallCNN().eval(), digits_like(), "npu-m", digits_like, qconfig=qconfig)
    assert prepared.fc.output_quantizer is None
    int_model = convert_fx(prepared)
    (quant,) = int_model.output_quant()
    assert quant.dtype == "int32" and quant.axis == -1 and len(quant.scales) == 10
    raw = int_model.run_integer(digits_like())
    assert raw.dtype == torch.int32
    assert_matches_reference(int_model, digits_like())
    scales = torch.tensor(quant.scales, dtype=torch.float32)
    x = digits_like(4)
    assert torch.equal(int_model(x), int_model.run_integer(x).float() * scales)


def test_qconfig_attributes_like_the_seed_flow():
    model = SmallCNN().eval()
    model.qconfig = default_calib_qconfig
    model.fc.qconfig = default_qat_int32_output_qconfig
    prepared = prepare_qat_fx(model, example_inputs=(digits_like(),), target="x86_64")
    assert isinstance(prepared.conv1.output_quantizer.observer, HistogramObserver)
    assert prepared.fc.output_dtype == "int32"


def test_custom_observer_qconfig():
    qconfig = QConfig(MinMaxObserver.with_args())
    prepared = prepare_qat_fx(SmallCNN(), qconfig, example_inputs=(digits_like(),), target="x86_64")
    assert all(isinstance(q.observer, MinMaxObserver) for q in _quantizers(prepared).values() if q.observer is not None)


@pytest.mark.parametrize(
    "qconfig,message",
    [
        ({"": default_qat_qconfig, "modules": {}}, r"unknown keys \['modules'\]"),
        ({"module_name": {"classifier": default_qat_qconfig}}, "module_name 'classifier' is not a module"),
        ({"": "qat"}, "'' must map to a QConfig"),
        (42, "qconfig must be a QConfig"),
    ],
)
def test_bad_qconfig(qconfig, message):
    with pytest.raises(QuantizationError, match=message):
        prepare_qat_fx(SmallCNN(), qconfig, example_inputs=(digits_like(),), target="x86_64")


def test_int32_output_must_feed_a_dequant_stub():
    qconfig = {"": default_qat_qconfig, "module_name": {"conv3": default_qat_int32_output_qconfig}}

    class NoActivation(SmallCNN):
        def __init__(self):
            super().__init__()
            self.relu = nn.Identity()

    with pytest.raises(QuantizationError, match="ConvAct2d 'conv3': an int32 output must go straight to a DeQuantStub"):
        prepare_qat_fx(NoActivation(), qconfig, example_inputs=(digits_like(),), target="x86_64")
    with pytest.raises(QuantizationError, match="int32 output cannot have a fused relu6"):
        prepare_qat_fx(SmallCNN(), qconfig, example_inputs=(digits_like(),), target="x86_64")


# ---- target constraints ---------------------------------------------------------------------------------------


def test_power_of_two_target_gives_pure_shifts():
    torch.manual_seed(0)
    int_model = integer_model(FunctionalOps().eval(), torch.randn(2, 3, 8, 8), "npu-s")
    for quant in int_model.tensor_quant.values():
        assert all(is_power_of_two(s) for s in quant.scales)
    for module in int_model.graph_module.modules():
        if isinstance(module, ops.IntConv2d):
            assert torch.all(module.multiplier == 2**30)
            assert all(is_power_of_two(s) for s in module.weight_scales)
        if isinstance(module, ops.IntAdd):
            assert all(m & (m - 1) == 0 for m in module.multipliers)


def test_concat_inputs_share_the_concat_scale_on_npu_s():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            x = self.quant(x)
            return self.dequant(torch.cat([self.a(x), F.relu(self.b(x))], 1))

    torch.manual_seed(0)
    example = torch.randn(2, 3, 6, 6)
    shared = integer_model(Branches().eval(), example, "npu-s")
    cat = shared.graph_module.cat
    assert all(m.multiplier == 2**30 and m.shift == 30 for m in cat.multipliers)  # identity: one scale
    assert shared.graph_module.a.output.scale == cat.output_scale == shared.graph_module.b.output.scale
    separate = integer_model(Branches().eval(), example, "npu-m")
    assert separate.graph_module.a.output.scale != separate.graph_module.b.output.scale
    assert_matches_reference(shared, torch.randn(2, 3, 6, 6))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: the BatchNorm as ``F.batch_norm`` on its own parameters, then the activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return F.relu(x)


class BatchNormEverywhere(nn.Module):
    """DenseNet's BN -> ReLU -> Conv after a concat, a BN after a ReLU with none after it, and a conv with
    BatchNormAct."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(9)
        self.conv1 = nn.Conv2d(9, 4, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_act = BatchNormAct(4)

    def forward(self, x):
        x = self.quant(x)
        x = torch.cat([self.stem(x), x], 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.dequant(self.bn_act(self.conv2(self.norm2(F.relu(x)))))


def _randomize_batchnorms(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_batchnorm_anywhere_is_a_per_channel_affine_or_folded(target):
    torch.manual_seed(0)
    model = BatchNormEverywhere().eval()
    _randomize_batchnorms(model)
    example = torch.randn(2, 3, 8, 8)
    int_model = integer_model(model, example, target)
    convs = [m for m in int_model.graph_module.modules() if isinstance(m, ops.IntConv2d)]
    affine = [m for m in convs if m.weight.shape[1:] == (1, 1, 1) and m.groups > 1]
    assert len(affine) == 2, "norm1 and norm2 (no conv before them) are depthwise 1x1 convs; bn_act folds into conv2"
    assert len(convs) == 5
    assert_matches_reference(int_model, torch.randn(3, 3, 8, 8))
    prepared = prepare_qat_fx(model, example_inputs=(example,), target=target).eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("halves_listed", [False, True])  # torch.fx, torch.export
@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_batchnorm1d_folds_into_linear_or_is_a_per_channel_affine(target, halves_listed):
    """tests/models.py's BatchNorms1d: the two BatchNorm1d after a linear layer of 2-D output (one an ``F.batch_norm``)
    fold into it, the three others (on (N, C, L), after a linear layer of a 3-D input, after a ReLU) are depthwise
    1x1 convs of their input viewed as NCHW; nothing stays float, the calibrating model is the float model and the
    integer model the reference."""
    torch.manual_seed(0)
    model = with_batchnorm_statistics(BatchNorms1d(halves_listed), (8, 4, 6))
    example = torch.randn(2, 4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        int_model = integer_model(model, example, target)
        prepared = prepare_qat_fx(model, example_inputs=(example,), target=target).eval()
    integer_ops = list(int_model.graph_module.modules())
    affine = [m for m in integer_ops if isinstance(m, ops.IntConv2d) and m.weight.shape[1:] == (1, 1, 1) and m.groups > 1]
    assert [m.groups for m in affine] == [4, 4, 12]
    assert sum(isinstance(m, ops.IntLinear) for m in integer_ops) == 3
    assert isinstance(prepared.get_submodule("fc1").bn, nn.BatchNorm1d) and prepared.get_submodule("fc1").activation.value == "relu"
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    x = torch.randn(5, 4, 6)
    torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
    assert_matches_reference(int_model, torch.randn(3, 4, 6))


def test_batchnorm1d_trains_its_statistics_through_the_fold():
    """In QAT, a BatchNorm1d folded into a linear layer or alone updates the model's own running statistics (the
    prepared op shares them) from the batch, as the float BatchNorm1d does."""
    torch.manual_seed(0)
    model = BatchNorms1d().eval()
    prepared = prepare_qat_fx(model, example_inputs=(torch.randn(2, 4, 6),), target="npu-m").train()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    x = torch.randn(16, 4, 6)
    prepared(x)
    model.train()(x)
    for op, norm in (("norm_sequence", model.norm_sequence), ("fc1", model.norm_fc1), ("norm_alone", model.norm_alone)):
        torch.testing.assert_close(prepared.get_submodule(op).bn.running_mean, norm.running_mean)
        torch.testing.assert_close(prepared.get_submodule(op).bn.running_var, norm.running_var)


@pytest.mark.parametrize("out_size", [(7, 3), (3, 5)])
def test_adaptive_avg_pool_with_uneven_windows(out_size):
    torch.manual_seed(0)
    model = _Wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(out_size))).eval()
    example = torch.randn(2, 3, 6, 9)
    prepared = prepare_qat_fx(model, example_inputs=(example,), target="x86_64").eval()
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    torch.testing.assert_close(prepared(example), model(example), rtol=1e-5, atol=1e-6)
    int_model = integer_model(model, example, "x86_64")
    assert_matches_reference(int_model, torch.randn(3, 3, 6, 9))


# ---- errors -----------------------------------------------------------------------------------------------------


class _Wrap(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.quant, self.body, self.dequant = QuantStub(), body, DeQuantStub()

    def forward(self, x):
        return self.dequant(self.body(self.quant(x)))


def _prepare(body, example=None, strict=True):
    example = torch.randn(1, 3, 8, 8) if example is None else example
    return prepare_qat_fx(_Wrap(body), example_inputs=(example,), target="npu-m", strict=strict)


def test_unsupported_op_names_node_and_op():
    with pytest.raises(UnsupportedOpError, match=r"Mish 'body.1': edgeq has no integer implementation.*strict=True"):
        _prepare(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Mish()))


def test_unsupported_settings_fall_back_to_float_unless_strict():
    with pytest.warns(FloatFallbackWarning, match=r"Upsample 'body': upsampling mode 'bicubic'.*runs in float"):
        prepared = _prepare(nn.Upsample(scale_factor=2, mode="bicubic"), strict=False)
    assert type(prepared.get_submodule("body")) is nn.Upsample


def test_product_with_a_constant_is_unsupported():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2.0

    with pytest.raises(UnsupportedOpError, match=r"mul 'mul' \(in body\): only the product of two quantized tensors"):
        _prepare(Scale())


def test_constant_add_is_unsupported():
    class AddConstant(nn.Module):
        def forward(self, x):
            return x + 1.0

    with pytest.raises(UnsupportedOpError, match=r"add 'add' \(in body\): only the sum of two quantized tensors"):
        _prepare(AddConstant())


def test_functional_batchnorm_without_running_statistics_is_unsupported():
    class NoStatistics(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return F.batch_norm(self.conv(x), None, None, training=True)

    with pytest.raises(UnsupportedOpError, match="batch_norm 'batch_norm' .*without running statistics"):
        _prepare(NoStatistics())


def test_module_called_twice_is_rejected():
    conv = nn.Conv2d(3, 3, 1)
    with pytest.raises(QuantizationError, match="Conv2d 'body.0': called 2 times"):
        _prepare(nn.Sequential(conv, conv))


class TwoActivations(nn.Module):
    """Two convolutions, each followed by Hardswish: one module each, or (``twice``) the first one called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)
        self.act, self.act2 = nn.Hardswish(), nn.Hardswish()
        self.twice = False

    def forward(self, x):
        second = self.act if self.twice else self.act2
        return self.dequant(second(self.conv2(self.act(self.conv1(self.quant(x))))))


def test_an_activation_called_twice_is_two_ops():
    torch.manual_seed(0)
    once_each = TwoActivations()
    twice = copy.deepcopy(once_each)
    twice.twice = True
    int_models = []
    for model in (twice, once_each):
        torch.manual_seed(1)  # the same calibration batches
        int_models.append(integer_model(model, digits_like(), "npu-s"))
    twice_int, once_int = int_models
    assert [type(twice_int.graph_module.get_submodule(path)) for path in ("act", "act_1")] == [ops.IntLookupTable] * 2
    x = digits_like(16)
    np.testing.assert_array_equal(twice_int.run_integer(x).numpy(), once_int.run_integer(x).numpy())
    assert_matches_reference(twice_int, x)


def test_float_and_quantized_tensors_must_not_mix():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()

        def forward(self, x):
            return self.dequant(self.quant(x) + x)

    with pytest.raises(QuantizationError, match="mixes quantized input 'quant' with float input 'x'"):
        prepare_qat_fx(Mix(), example_inputs=(torch.randn(1, 3),), target="x86_64")


def test_model_without_stubs():
    with pytest.raises(QuantizationError, match="no edgeq QuantStub"):
        prepare_qat_fx(nn.Conv2d(3, 3, 1), example_inputs=(torch.randn(1, 3, 4, 4),), target="x86_64")


def test_output_without_dequant_stub():
    class NoDequant(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.conv = QuantStub(), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.quant(x))

    with pytest.raises(QuantizationError, match="model output: 'conv' is quantized; put a DeQuantStub"):
        prepare_qat_fx(NoDequant(), example_inputs=(torch.randn(1, 3, 4, 4),), target="x86_64")


def test_data_dependent_control_flow_is_a_trace_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="torch.fx could not trace _Wrap.*data-dependent control flow"):
        _prepare(Branchy())


def test_convert_before_calibration_names_the_quantizer():
    prepared = prepare_qat_fx(SmallCNN(), example_inputs=(digits_like(),), target="npu-m")
    with pytest.raises(QuantizationError, match="'conv1': its activation range has not been observed; run calibration"):
        convert_fx(prepared)


def test_convert_needs_a_prepared_model():
    with pytest.raises(QuantizationError, match="was not prepared by edgeq's prepare_qat_fx"):
        convert_fx(SmallCNN())


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(QuantizationError, match=r"Write example_inputs=\(x,\)"):
        prepare_qat_fx(SmallCNN(), example_inputs=digits_like(), target="npu-m")


def test_the_example_inputs_do_not_reach_the_batchnorm_statistics():
    """Preparing a model in training mode runs the example through it once; its BatchNorms count nothing of it."""
    model = SmallCNN().train()
    prepared = prepare_qat_fx(model, example_inputs=(digits_like() * 5 + 3,), target="npu-m")
    for folded, batchnorm in [(prepared.conv1.bn, model.bn1), (prepared.conv2.bn, model.bn2)]:
        assert int(folded.num_batches_tracked) == 0
        assert torch.equal(folded.running_mean, batchnorm.running_mean) and torch.equal(folded.running_var, batchnorm.running_var)


class Normalized5d(nn.Module):
    """``F.batch_norm`` of a 5-D tensor."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm3d(3).eval()

    def forward(self, x):
        norm = self.norm
        return F.batch_norm(x.unsqueeze(2), norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.1, norm.eps)


class PadWith(nn.Module):
    """``F.pad`` of the given settings."""

    def __init__(self, pad=(1, 1), **settings):
        super().__init__()
        self.pad, self.settings = pad, settings

    def forward(self, x):
        return F.pad(x, self.pad, **self.settings)


@pytest.mark.parametrize(
    "body,message",
    [
        (nn.AvgPool2d(3, 1, 1, count_include_pad=False), "count_include_pad=False"),
        (nn.Upsample(scale_factor=2, mode="bicubic"), "upsampling mode 'bicubic'"),
        (nn.Upsample(scale_factor=1.3, mode="bilinear"), r"scale_factor \(1.3, 1.3\) maps \(8, 8\) to \(10, 10\)"),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), "padding_mode 'reflect'"),
        (nn.ReflectionPad2d(1), "ReflectionPad2d 'body': edgeq has no integer implementation"),
        (nn.ConstantPad2d(1, 0.5), r"ConstantPad2d 'body': padding with 0.5 \(allowed: zeros\)"),
        (PadWith((1, 1, 1, 1), mode="replicate"), r"pad 'pad' \(in body\): padding mode 'replicate'"),
        (PadWith(pad=(-1, 0)), r"negative padding \[-1, 0\] \(a crop: slice instead\)"),
        (nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(3, track_running_stats=False)), "BatchNorm1d without running statistics"),
        (Normalized5d(), r"batch_norm 'batch_norm' \(in body\): BatchNorm of a 5-D tensor"),
    ],
)
def test_unsupported_settings(body, message):
    with pytest.raises(UnsupportedOpError, match=message):
        _prepare(body)


def test_conv_padding_same_is_made_explicit():
    prepared = _prepare(nn.Conv2d(3, 4, 5, padding="same"))
    assert isinstance(prepared.body, ConvAct2d) and prepared.body.padding == (2, 2)


def test_calibrate_needs_batches_and_accepts_input_tuples():
    example = torch.rand(2, 1, 8, 8)
    with pytest.raises(QuantizationError, match="calibrate: no batches given"):
        edgeq_calibrate(SmallCNN().eval(), [], example_inputs=(example,), target="npu-m")
    model = SmallCNN().eval()
    by_tensor = edgeq_calibrate(copy.deepcopy(model), [example], example_inputs=(example,), target="npu-m")
    by_tuple = edgeq_calibrate(model, [(example,)], example_inputs=(example,), target="npu-m")
    np.testing.assert_array_equal(convert_fx(by_tensor).run_integer(example), convert_fx(by_tuple).run_integer(example))
