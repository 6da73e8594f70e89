"""The edge models compiled for the Arm Ethos-U targets: mobilenet_v2, resnet18, mobilenet_v3_small (lookup tables,
products) and the YOLO-style detector at 64x64 on ethos-u65-256, mobilenet_v3_small on ethos-u55-128 too, each
compiled once with the bit-exact simulation: the artifact run by the Python runtime equals the integer model, Vela
compiled every NPU region, and check's NPU placement is what Vela compiled."""

from __future__ import annotations

import pytest
import torch
from ethos_u import assert_equal, assert_vela_compiled_every_npu_region, expected, python_outputs
from models import YoloStyleDetector, integer_model, torchvision_model

from edgeq.compile import CompileResult, compile_model
from edgeq.quantization.integer_model import IntegerModel

pytestmark = pytest.mark.flow  # quantizes and compiles five networks with TVM and Vela

MODELS = ("mobilenet_v2", "resnet18", "mobilenet_v3_small", "yolo")
CASES = [("ethos-u65-256", name) for name in MODELS] + [("ethos-u55-128", "mobilenet_v3_small")]
"""(target, model): the four on the U65, and the one with lookup tables and products on the U55 too."""
SHAPE = (1, 3, 64, 64)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (YoloStyleDetector() if name == "yolo" else torchvision_model(name)).eval()


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def compiled(request, tmp_path_factory) -> tuple[str, IntegerModel, CompileResult, torch.Tensor]:
    """The model quantized for the target and compiled once, with an input drawn apart from the calibration."""
    target, name = request.param
    int_model = integer_model(build(name), torch.randn(SHAPE), target)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = tmp_path_factory.mktemp(name) / f"{name}.edgeq"
    return target, int_model, compile_model(int_model, (x,), target=target, out=out, simulate=True), x


def test_artifact_equals_the_integer_model(compiled):
    _, int_model, result, x = compiled
    assert_equal(python_outputs(result.artifact, x), expected(int_model, x))


def test_vela_compiled_every_npu_region(compiled):
    """Every NPU region has its Vela command stream, and check placed on the NPU exactly the ops they hold."""
    target, _, result, _ = compiled
    assert result.manifest["npu_command_streams"]
    assert_vela_compiled_every_npu_region(result, target)
