"""torchvision classifiers, random init, quantized without manual edits on every target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import calibrate, torchvision_model
from reference import run_reference

from edgeq.quantization import FakeQuantState, convert_fx, default_qat_qconfig, prepare_qat_fx, set_fake_quantize
from edgeq.quantization.integer_ops import IntConv2d

pytestmark = pytest.mark.flow  # torchvision models quantized and trained

MODELS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"]
SIZE = 64


@pytest.fixture(scope="module", params=MODELS)
def float_model(request):
    return request.param, torchvision_model(request.param)


@pytest.mark.parametrize("target", ["x86_64", "npu-m", "npu-s"])
def test_integer_model_is_exact_and_tracks_fake_quant(float_model, target):
    name, model = float_model
    torch.manual_seed(1)
    example = torch.randn(2, 3, SIZE, SIZE)
    prepared = calibrate(model, example, target, lambda: torch.randn(4, 3, SIZE, SIZE), count=2)
    int_model = convert_fx(prepared)
    x = torch.randn(4, 3, SIZE, SIZE)
    np.testing.assert_array_equal(int_model.run_integer(x).numpy(), run_reference(int_model.graph_module, x.numpy()))
    reference, fake, real = model(x), prepared(x), int_model(x)
    step = int_model.output_quant()[0].scale
    assert torch.max(torch.abs(reference)) > 50 * step, "the output must span many steps for this to mean anything"
    # Near-ties that float32 rounds one way and the integer ops the other differ by one step; random-init networks
    # amplify such differences with depth. The integer model must approximate the float model as well as the
    # fake-quantized model does.
    fake_error = torch.mean(torch.abs(reference - fake))
    integer_error = torch.mean(torch.abs(reference - real))
    assert integer_error <= 2 * fake_error + step, (name, integer_error / step, fake_error / step)
    assert sum(isinstance(m, IntConv2d) for m in int_model.modules()) >= 20


def test_qat_training_step_on_mobilenet_v2():
    torch.manual_seed(0)
    model = torchvision_model("mobilenet_v2").train()
    example = torch.randn(2, 3, SIZE, SIZE)
    qat = prepare_qat_fx(model, default_qat_qconfig, example_inputs=(example,), target="npu-s")
    set_fake_quantize(qat, FakeQuantState.QAT)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    loss = F.cross_entropy(qat(torch.randn(4, 3, SIZE, SIZE)), torch.randint(0, 10, (4,)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in qat.parameters() if p.requires_grad)
    qat.eval()
    set_fake_quantize(qat, FakeQuantState.VALIDATION)
    int_model = convert_fx(qat)
    assert int_model(example).shape == (2, 10)
