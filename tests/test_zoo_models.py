"""Models of the zoos edge users pick from, random init, 64x64, through the whole flow on x86_64: prepare,
calibrate, convert, to_onnx, compile; the artifact equals the integer model. timm's two vision transformers keep
ops in float: their artifacts' float regions are measured one by one against the integer model's, given the same
inputs.

timm's CNNs have no op in float. ultralytics' YOLOv8n (whose ``Conv`` shares one ``nn.SiLU`` among all its
convolutions) runs whole, its Detect head's decoding included: the anchors and strides (``torch.arange(w).type_as(
feature)``, ``feature.new_full(...)``) are quantized constants, the distance-to-box arithmetic and the class sigmoid
integer ops, and four ops fall back to float, announced (the DFL's softmax over 16 bins, two subtractions and a
division by 2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from models import Wrapped, calibrate, with_batchnorm_statistics
from torch import nn

from edgeq.compile import compile_model
from edgeq.compile.float_regions import float_region_differences
from edgeq.export import to_onnx
from edgeq.quantization import DeQuantStub, QuantStub, convert_fx
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq_runtime import Model

pytestmark = pytest.mark.flow  # quantizes and compiles whole networks

SIZE = 64
TIMM_MODELS = ["mobilenetv3_large_100", "hardcorenas_a", "fbnetv3_b", "hgnetv2_b0"]


class YoloWhole(nn.Module):
    """ultralytics' YOLOv8n between a QuantStub and a DeQuantStub: its decoded output (boxes in pixels, class
    probabilities), shape (1, 4 + 80, anchors)."""

    def __init__(self) -> None:
        super().__init__()
        from ultralytics.nn.tasks import DetectionModel

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.model = DetectionModel("yolov8n.yaml", verbose=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoded, _ = self.model(self.quant(x))
        return self.dequant(decoded)


YOLO_FLOAT_OPS = ["softmax 'softmax' (in model.model.22.dfl)", "sub 'sub' (in model.model.22)", "div 'div' (in model.model.22)",
                  "sub 'sub_1' (in model.model.22)"]
"""The ops of YOLOv8n's decoding edgeq has no integer form of, as prepare's FloatFallbackWarnings name them."""


def _with_statistics(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm's running statistics those of random batches (a cumulative average: fresh
    statistics let random-init activations vanish over the layers)."""
    for layer in model.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = None
    return with_batchnorm_statistics(model, (2, 3, SIZE, SIZE))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "yolov8n":
        whole = YoloWhole()
        _with_statistics(whole.model)  # in train mode the model returns Detect's raw maps, not the decoded output
        return whole.eval()
    import timm

    return _with_statistics(Wrapped(timm.create_model(name, pretrained=False)))


def _float_ops(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message).split(":")[0] for w in caught if issubclass(w.category, FloatFallbackWarning)]


@pytest.mark.parametrize("name", ["yolov8n", *TIMM_MODELS])
def test_zoo_model_compiles_to_an_artifact_equal_to_the_integer_model(name, tmp_path):
    model = _build(name)
    example = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FloatFallbackWarning)
        prepared = calibrate(model, example, "x86_64", lambda: torch.randn(1, 3, SIZE, SIZE), count=2)
    assert _float_ops(caught) == (YOLO_FLOAT_OPS if name == "yolov8n" else [])
    int_model = convert_fx(prepared)
    to_onnx(int_model, (example,), tmp_path / "model.onnx")
    result = compile_model(tmp_path / "model.onnx", (example,), target="x86_64", out=tmp_path / "model.edgeq")
    assert {n.placement.value for n in result.report.nodes} == {"CPU"}
    x = torch.randn(1, 3, SIZE, SIZE)
    expected = int_model.run_integer(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    with Model.load(result.artifact) as artifact:
        got = list(artifact.run(x.numpy(), raw=True).values())
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e.numpy())


VISION_TRANSFORMERS = {"mobilevitv2_050": {}, "tiny_vit_5m_224": {"depths": (1, 1, 2, 1)}}
"""timm's two vision transformers of issue 32, TinyViT with fewer blocks (its float regions are those of every
block; the end-to-end figures of docs/numerics.md are the whole models')."""


@pytest.mark.parametrize("name", VISION_TRANSFORMERS)
def test_vision_transformer_artifacts_differ_only_by_their_float_regions_own_step(name, tmp_path):
    """The float fallback's bound (docs/numerics.md): given the same inputs, each float region (GroupNorm /
    LayerNorm, softmax, attention) of the x86_64 artifact gives the integer model's integers within 1 step, on at
    most 0.1 % of its values, and the integer ops between them are exact: every difference end to end is such a
    step carried on."""
    import timm

    torch.manual_seed(0)
    model = _with_statistics(Wrapped(timm.create_model(name, pretrained=False, num_classes=10, **VISION_TRANSFORMERS[name])))
    example = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)
        prepared = calibrate(model, example, "x86_64", lambda: torch.randn(2, 3, SIZE, SIZE), count=3)
    int_model = convert_fx(prepared)
    to_onnx(int_model, (example,), tmp_path / "model.onnx")
    comparison = float_region_differences(tmp_path / "model.onnx", int_model, (torch.randn(1, 3, SIZE, SIZE),), "x86_64", tmp_path)
    assert len(comparison.regions) >= 9
    steps = np.concatenate([region.steps.ravel() for region in comparison.regions])
    assert steps.max() <= 1
    assert np.count_nonzero(steps) <= 0.001 * steps.size
    for tensor, difference in comparison.integer_ops.items():
        assert not difference.any(), tensor
