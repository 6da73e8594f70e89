"""The models edge users ship, through the whole default flow at 64x64 or less (issue 9): prepare, calibrate,
convert, QDQ export, check on npu-s and npu-m, compile for x86_64; the artifact equals the integer model, or agrees
with it within the float-fallback bound where an op has no integer form yet. The torchvision models are captured
by torch.fx; a YOLOv8-style detector, which torch.fx cannot trace, by torch.export."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.fx as fx
from models import YoloStyleDetector, assert_within_float_region_bound, calibrate, torchvision_model, with_batchnorm_statistics
from reference import run_reference

from edgeq.check import check_model
from edgeq.check.report import FLOAT_PLACEMENT, Placement
from edgeq.compile import compile_model
from edgeq.export import to_onnx
from edgeq.quantization import convert_fx
from edgeq.quantization.capture import CAPTURE_ATTRIBUTE, Capture
from edgeq.quantization.prepare import FloatFallbackWarning
from edgeq_runtime import Model

pytestmark = pytest.mark.flow  # full-size models through the whole flow

SIZE = 64
"""Below 224: vgg11's adaptive pooling from 2x2 to 7x7 has windows of different sizes."""


@dataclass(frozen=True)
class EdgeModel:
    """A model of the flow and what to expect of it."""

    settings: dict[str, object] = field(default_factory=dict)
    """Constructor arguments."""
    size: int = SIZE
    """Input height and width."""
    float_ops: int = 0
    """Ops with no integer form, left in float: prepare warns for each, check places each CPU (float), and the
    artifact agrees with the integer model within the float-fallback bound (the segmentation models' bilinear
    interpolations are integer ops now: none left)."""


MODELS = {
    "mobilenet_v3_small": EdgeModel(),
    "mobilenet_v3_large": EdgeModel(),
    "efficientnet_b0": EdgeModel(),
    "vgg11": EdgeModel(),
    # BN -> ReLU -> Conv after each concat, transitions, the final BN; about 100 distinct kernels (2-3 min here).
    "densenet121": EdgeModel(),
    # ASPP's pooled branch (1x1 back to the map) and the logits back to the input size.
    "deeplabv3_mobilenet_v3_large": EdgeModel(),
    # The logits back to the input size; 32x32 (a 4x4 map at output stride 8) keeps ResNet50's compile short.
    "fcn_resnet50": EdgeModel(size=32),
    # The class token and position embedding enter as quantized constants; each LayerNorm (2 per layer and the
    # last) and nn.MultiheadAttention stay float.
    "VisionTransformer": EdgeModel(
        dict(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64), float_ops=7
    ),
}


def fallback_messages(prepare: Callable[[], fx.GraphModule]) -> tuple[fx.GraphModule, list[str]]:
    """``prepare()``'s result and the FloatFallbackWarning messages it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FloatFallbackWarning)
        result = prepare()
    return result, [str(w.message) for w in caught if issubclass(w.category, FloatFallbackWarning)]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_whole_flow(name, tmp_path):
    spec = MODELS[name]
    shape = (3, spec.size, spec.size)
    torch.manual_seed(0)
    model = torchvision_model(name, **spec.settings)
    example = torch.randn(1, *shape)
    prepared, fallbacks = fallback_messages(lambda: calibrate(model, example, "x86_64", lambda: torch.randn(2, *shape), count=2))
    assert len(fallbacks) == spec.float_ops, fallbacks
    int_model = convert_fx(prepared)
    onnx_file = to_onnx(int_model, (example,), tmp_path / f"{name}.onnx")
    for target in ("npu-s", "npu-m"):
        report = check_model(onnx_file, target=target)
        assert report.deployable, str(report)
        # Every op the NPU does not take runs on its host, and the report says why.
        assert all(node.reasons for node in report.nodes if node.placement is Placement.CPU)
        # one float op may be several ONNX nodes (LayerNorm's arithmetic), each naming it in its reason
        assert len({node.record.float_reason for node in report.nodes if node.where == FLOAT_PLACEMENT}) == spec.float_ops
    x = torch.randn(1, *shape)
    expected = int_model.run_integer(x).numpy()
    np.testing.assert_array_equal(expected, run_reference(int_model.graph_module, x.numpy()))
    compiled = compile_model(int_model, (example,), out=tmp_path / "model.edgeq")
    with Model.load(compiled.artifact) as artifact:
        got = artifact.run(x.numpy(), raw=True)["dequant"]
    if spec.float_ops:
        assert_within_float_region_bound(got, expected)
    else:
        np.testing.assert_array_equal(got, expected)


NPU_S_REASONS = {"silu": "op_not_on_npu", "sigmoid": "op_not_on_npu", "split": "op_not_on_npu", "max_pool2d": "max_kernel"}
"""Why npu-s leaves the detector's ops to its host: no lookup tables nor split, and 3x3 max pooling at most
(SPPF's is 5x5)."""


def test_yolo_style_detector(tmp_path):
    """C2f iterates over chunks, so torch.fx cannot trace it: torch.export captures it, and the flow is the same.
    Calibrated for npu-s (power-of-two scales, shared concat scales), compiled for x86_64."""
    shape = (3, SIZE, SIZE)
    torch.manual_seed(0)
    model = with_batchnorm_statistics(YoloStyleDetector())
    example = torch.randn(1, *shape)
    prepared = calibrate(model, example, "npu-s", lambda: torch.randn(2, *shape), count=2)
    assert getattr(prepared, CAPTURE_ATTRIBUTE) is Capture.EXPORT
    int_model = convert_fx(prepared)
    onnx_file = to_onnx(int_model, (example,), tmp_path / "detector.onnx")

    npu_s = check_model(onnx_file, target="npu-s")
    assert npu_s.deployable, str(npu_s)
    for node in npu_s.nodes:
        if node.record.op in NPU_S_REASONS:
            assert node.placement is Placement.CPU and [r.rule for r in node.reasons] == [NPU_S_REASONS[node.record.op]]
        elif node.record.op == "concat":  # on the NPU where its inputs can share its scale
            assert node.placement is Placement.NPU or [r.rule for r in node.reasons] == ["concat_shared_scale"]
        else:  # convs, adds, the upsampling
            assert node.placement is Placement.NPU, node.record.name
    assert {"conv2d", "add", "concat", "upsample_nearest2d", *NPU_S_REASONS} == {n.record.op for n in npu_s.nodes}
    npu_m = check_model(onnx_file, target="npu-m")
    assert npu_m.summary.ops_on_npu == npu_m.summary.ops, str(npu_m)  # every op on npu-m

    x = torch.randn(1, *shape)
    expected = int_model.run_integer(x).numpy()
    compiled = compile_model(int_model, (example,), target="x86_64", out=tmp_path / "detector.edgeq")
    with Model.load(compiled.artifact) as artifact:
        np.testing.assert_array_equal(artifact.run(x.numpy(), raw=True)["dequant"], expected)
