"""A layer whose bias is large for its tiny ``s_in * s_w`` (a random-init YOLO Detect head: box biases 2.0 and class
biases log(5 / nc / (640 / stride)**2) after activations that shrank over the layers) converts with an int64
accumulator, exactly (docs/numerics.md sections 3 and 5): convert warns naming the layer, the QDQ file holds the
bias as int32 integers at ``s_in * s_w[c] * 2**k``, check places the layer on the CPU with the reason, and the
artifact equals the integer model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from models import integer_model
from onnx import numpy_helper
from torch import nn

from edgeq.compile import compile_model
from edgeq.export import to_onnx, trace
from edgeq.export.peer import PEER_PATHS, session, steps_apart
from edgeq.numerics import INT32_MAX, bias_scales
from edgeq.quantization import DeQuantStub, QuantStub
from edgeq.quantization.convert import WideAccumulatorWarning
from edgeq_runtime import Model

DETECT_BIASES = [2.0, 2.0, -11.5, -10.1, -8.7, 0.25]


class TinyInputHead(nn.Module):
    """A conv whose outputs are ~1e-5 (its weights scaled down), then a 1x1 conv with Detect-like biases."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.features = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, len(DETECT_BIASES), 1)
        with torch.no_grad():
            self.features.weight.mul_(1e-5)
            self.features.bias.zero_()
            self.head.bias.copy_(torch.tensor(DETECT_BIASES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.head(self.features(self.quant(x))))


def _converted(target: str):
    torch.manual_seed(0)
    example = torch.randn(1, 3, 8, 8)
    with pytest.warns(WideAccumulatorWarning, match=r"^ConvAct2d 'head': its accumulator can reach \d+ \(int32: up to 2147483647; "
                                                    r"channel 2's bias is -\d+ steps .* int64 accumulator, on the CPU of NPU targets"):
        int_model = integer_model(TinyInputHead().eval(), example, target)
    return int_model, example


def test_a_bias_beyond_int32_is_written_at_a_power_of_two_multiple_of_its_scale(tmp_path):
    int_model, example = _converted("x86_64")
    head = int_model.graph_module.head
    assert head.bias.dtype == torch.int64 and int(head.bias.abs().max()) > INT32_MAX
    onnx_model = onnx.load(to_onnx(int_model, (example,), tmp_path / "model.onnx"))
    constants = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    values, scales = constants["head.bias_q"], constants["head.bias_q.scale"]
    exponents = np.round(np.log2(scales / np.float32(bias_scales(head.input_scale, head.weight_scales)))).astype(np.int64)
    assert values.dtype == np.int32 and exponents.min() >= 0 and exponents.max() > 0
    np.testing.assert_array_equal(values.astype(np.int64) << exponents, head.bias.numpy())


def test_onnx_runtime_without_graph_optimizations_runs_the_file_within_a_step(tmp_path):
    """ORT's float path reads the bias's scale (its fused QLinearConv does not: docs/numerics.md section 8)."""
    int_model, example = _converted("x86_64")
    path = to_onnx(int_model, (example,), tmp_path / "model.onnx")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    (got,) = session(onnx.load(str(path)), PEER_PATHS["float"]).run(None, {"x": x.numpy()})
    assert steps_apart(got, int_model.run_integer(x), int_model.output_quant()[0].scales[0]).max() <= 1


def test_the_traced_integer_model_requantizes_a_wide_accumulator_as_the_integer_model():
    """The split requantization is chosen once per layer, not per input (a trace records one path): the traced
    model equals the integer model on other inputs."""
    int_model, example = _converted("x86_64")
    traced = trace(int_model, (torch.zeros_like(example),))
    for seed in range(3):
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 4
        np.testing.assert_array_equal(traced(x).numpy(), int_model(x).detach().numpy())


@pytest.mark.flow
@pytest.mark.parametrize("target", ["x86_64", "npu-s"])
def test_a_wide_accumulator_compiles_to_an_artifact_equal_to_the_integer_model(target, tmp_path):
    int_model, example = _converted(target)
    result = compile_model(int_model, (example,), target=target, out=tmp_path / "model.edgeq", simulate=target != "x86_64")
    (head,) = [n for n in result.report.nodes if n.record.name.startswith("head")]
    assert head.placement.value == "CPU"
    assert [r.rule for r in head.reasons] == ["int64_accumulator"]
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with Model.load(result.artifact) as artifact:
        (got,) = artifact.run(x.numpy(), raw=True).values()
    np.testing.assert_array_equal(got, int_model.run_integer(x).numpy())
