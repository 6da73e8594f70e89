"""The torchvision models edge users ship, through the whole default flow at 64x64 (issue 9): prepare, calibrate,
convert, QDQ export, check on npu-s and npu-m, compile for x86_64, and the artifact equals the integer model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.check import check_model
from edgeq.check.report import Placement
from edgeq.compile import compile_model
from edgeq.export import to_onnx
from edgeq.quantization import convert_fx
from edgeq_runtime import Model
from models import calibrate, torchvision_model
from reference import run_reference

SIZE = 64
"""Below 224: vgg11's adaptive pooling from 2x2 to 7x7 has windows of different sizes."""


MODELS = {
    "mobilenet_v3_small": {},
    "efficientnet_b0": {},
    "vgg11": {},
    # densenet121's layers (BN -> ReLU -> Conv after each concat, transitions, the final BN) with two dense
    # layers per block: compiling all 121 layers takes minutes here; test_densenet121_checks covers its size.
    "DenseNet": {"block_config": (2, 2, 2, 2)},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_whole_flow_is_exact(name, tmp_path):
    torch.manual_seed(0)
    model = torchvision_model(name, **MODELS[name])
    example = torch.randn(1, 3, SIZE, SIZE)
    int_model = convert_fx(calibrate(model, example, "x86_64", lambda: torch.randn(2, 3, SIZE, SIZE), count=2))
    onnx_file = to_onnx(int_model, (example,), tmp_path / f"{name}.onnx")
    for target in ("npu-s", "npu-m"):
        report = check_model(onnx_file, target=target)
        assert report.deployable, str(report)
        # Every op the NPU does not take runs on its host, and the report says why.
        assert all(node.reasons for node in report.nodes if node.placement is Placement.CPU)
    x = torch.randn(1, 3, SIZE, SIZE)
    expected = int_model.run_integer(x).numpy()
    np.testing.assert_array_equal(expected, run_reference(int_model.graph_module, x.numpy()))
    compiled = compile_model(int_model, (example,), out=tmp_path / "model.edgeq")
    with Model.load(compiled.artifact) as artifact:
        np.testing.assert_array_equal(artifact.run(x.numpy(), raw=True)["dequant"], expected)


def test_densenet121_checks():
    model = torchvision_model("densenet121")
    for target in ("npu-s", "npu-m"):
        assert check_model(model, (torch.randn(1, 3, SIZE, SIZE),), target=target).deployable
