"""Models of the zoos edge users pick from, random init, 64x64, through the whole flow on x86_64: prepare,
calibrate, convert, to_onnx, compile; the artifact equals the integer model, and no op falls back to float.

ultralytics' YOLOv8n (whose ``Conv`` shares one ``nn.SiLU`` among all its convolutions) ends at its Detect head's
two raw maps: the box decoding after them (anchors, distances to boxes, a softmax over the distance bins) is
float post-processing an application runs on the artifact's outputs."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from models import Wrapped, calibrate, with_batchnorm_statistics
from torch import nn

from edgeq.compile import compile_model
from edgeq.export import to_onnx
from edgeq.quantization import DeQuantStub, QuantStub, convert_fx
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq_runtime import Model

pytestmark = pytest.mark.flow  # quantizes and compiles whole networks

SIZE = 64
TIMM_MODELS = ["mobilenetv3_large_100", "hardcorenas_a", "fbnetv3_b", "hgnetv2_b0"]


def _raw_head(detect: nn.Module, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detect's forward without the box decoding: its concatenated box and class maps."""
    return detect.forward_head(feats, **detect.one2many)


class YoloMaps(nn.Module):
    """ultralytics' YOLOv8n between a QuantStub and a DeQuantStub for each of Detect's raw maps (boxes, scores)."""

    def __init__(self) -> None:
        super().__init__()
        from ultralytics.nn.tasks import DetectionModel

        self.quant, self.dequant_boxes, self.dequant_scores = QuantStub(), DeQuantStub(), DeQuantStub()
        self.model = DetectionModel("yolov8n.yaml", verbose=False)
        detect = self.model.model[-1]
        detect.forward = types.MethodType(_raw_head, detect)  # a bound method: deep copies bind to the copy

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model(self.quant(x))
        return self.dequant_boxes(maps["boxes"]), self.dequant_scores(maps["scores"])


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
        return _with_statistics(YoloMaps())
    import timm

    return _with_statistics(Wrapped(timm.create_model(name, pretrained=False)))


@pytest.mark.parametrize("name", ["yolov8n", *TIMM_MODELS])
def test_zoo_model_compiles_to_an_artifact_equal_to_the_integer_model(name, tmp_path):
    model = _build(name)
    example = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatFallbackWarning)
        prepared = calibrate(model, example, "x86_64", lambda: torch.randn(1, 3, SIZE, SIZE), count=2)
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
