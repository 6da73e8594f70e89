"""Every contrib op ONNX Runtime's ``quantize_static(quant_format=QOperator)`` writes for torchvision models
(QLinearConv, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, QGemm, and MaxPool / Flatten on integers) is
read as QDQ (edgeq/export/qoperator.py): the artifact is within one output step of ONNX Runtime on the original
file. Slow: each model is built whole."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from models import float_onnx, ort_quantize_static, random_batches, torchvision_model, without_identities
from onnxruntime.quantization import QuantFormat, QuantType

from edgeq.compile import compile_model
from edgeq.export.peer import session
from edgeq_runtime import Model

SHAPE = (1, 3, 64, 64)
MODELS = {  # the contrib ops each file holds
    "resnet18": {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"},
    "mobilenet_v2": {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"},
    "googlenet": {"QLinearConv", "QLinearConcat", "QLinearGlobalAveragePool", "QGemm"},
}


@pytest.fixture(scope="module")
def float_file(tmp_path_factory) -> Callable[[str], Path]:
    """``float_file(name)``: the float ONNX file of the torchvision model ``name``, exported once for both
    activation types."""
    exported: dict[str, Path] = {}

    def of(name: str) -> Path:
        if name not in exported:
            path = tmp_path_factory.mktemp(name) / "f.onnx"
            if name == "googlenet":
                import torchvision

                torch.manual_seed(0)
                model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
                exported[name] = without_identities(float_onnx(model, torch.randn(SHAPE), path))
            else:
                exported[name] = float_onnx(torchvision_model(name), torch.randn(SHAPE), path)
        return exported[name]

    return of


@pytest.mark.flow
@pytest.mark.parametrize("activation", [QuantType.QUInt8, QuantType.QInt8], ids=["uint8", "int8"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qoperator_files_of_torchvision_models_are_within_one_step(name, activation, float_file, tmp_path):
    path = ort_quantize_static(float_file(name), tmp_path / "q.onnx", random_batches(SHAPE, count=2), activation=activation,
                               per_channel=activation is QuantType.QInt8, quant_format=QuantFormat.QOperator)
    model_file = onnx.load(str(path))
    assert MODELS[name] <= {n.op_type for n in model_file.graph.node}
    result = compile_model(path, target="x86_64", out=tmp_path / "q.edgeq", opt_level=0, progress=lambda _: None)
    peer, quant = session(model_file), result.manifest["outputs"][0]["quant"]
    with Model.load(result.artifact) as artifact:
        output = artifact.outputs[0].name
        for x in random_batches(SHAPE, count=2, seed=1):
            ours = artifact.run({"x": x}, raw=True)[output].astype(np.int64)
            (theirs,) = peer.run(None, {"x": x})
            assert np.abs(ours - (np.rint(theirs / np.float32(quant["scale"][0])) + quant["zero_point"][0])).max() <= 1
