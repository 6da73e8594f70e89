"""check on the Arm Ethos-U targets: the digits CNN and mobilenet_v2 placed on each, the reasons of ops off the NPU,
the limits Vela has that the other NPUs do not (stride above 3 only unpadded, padded average pools up to 8x8), and
the U55, whose Cortex-M55 host edgeq builds no code for: an op the U55 cannot run is unsupported and compile refuses
it before any work."""

from __future__ import annotations

import pytest
import torch
from conftest import load_example
from models import Wrapped, integer_model, torchvision_model
from torch import nn

from edgeq.check import Placement, check_model
from edgeq.compile import compile_model
from edgeq.errors import CompileError

ETHOS_U = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")
NO_HOST = "ethos-u55-128's host is a Cortex-M55; edgeq builds no host code; keep the op out of the quantized region or run it in your firmware"


def single_op(body: nn.Module, target: str, example: torch.Tensor, name: str = "model.0"):
    return check_model(Wrapped(body).eval(), (example,), target=target).node(name)


def reasons(node) -> list[str]:
    return [r.message for r in node.reasons]


@pytest.mark.parametrize("target", ETHOS_U)
def test_digits_cnn_runs_on_the_npu(target):
    digits = load_example("digits_qat")
    report = check_model(digits.DigitsNet().eval(), (torch.randn(1, 1, 8, 8),), target=target)
    assert report.deployable and report.summary.ops_on_cpu == 0, [(n.record.name, reasons(n)) for n in report.nodes if n.reasons]
    assert report.summary.verdict == f"NPU-ready: every op runs on {target}"


@pytest.mark.parametrize("target", ETHOS_U)
def test_mobilenet_v2_runs_on_the_npu(target):
    report = check_model(torchvision_model("mobilenet_v2").eval(), (torch.randn(1, 3, 64, 64),), target=target)
    off = [(n.record.name, reasons(n)) for n in report.nodes if n.placement is not Placement.NPU]
    assert not off and report.summary.ops_on_npu == report.summary.ops > 60 and report.summary.npu_mac_share == 1.0


@pytest.mark.parametrize("target", ETHOS_U)
def test_quantized_mobilenet_v2_runs_on_the_npu(target):
    """The integer model quantized for the target, checked as its QDQ description (scales included)."""
    x = torch.randn(1, 3, 64, 64)
    report = check_model(integer_model(torchvision_model("mobilenet_v2").eval(), x, target), (x,))
    assert report.target.name == target
    assert [(n.record.name, reasons(n)) for n in report.nodes if n.placement is not Placement.NPU] == []
    assert report.summary.verdict == f"NPU-ready: every op runs on {target}"


def test_bilinear_resize_stays_on_the_cpu_and_says_why():
    bilinear = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"))
    for target in ("ethos-u65-256", "ethos-u85-256"):
        node = single_op(bilinear, target, torch.randn(1, 8, 8, 8))
        assert node.placement is Placement.CPU
        assert reasons(node) == [
            f"upsample_bilinear2d is not among {target}'s ops: edgeq's bilinear arithmetic (11-bit weights, "
            "docs/numerics.md) is not TOSA RESIZE's, whose result Vela needs rescaled by a power of two"
        ]
    node = single_op(bilinear, "ethos-u55-128", torch.randn(1, 8, 8, 8))
    assert node.placement is Placement.UNSUPPORTED and reasons(node)[-1] == NO_HOST


def test_stride_above_3_only_without_padding():
    """Vela 5.2.0 compiles a stride of 4 on the U55 and U65 only without padding, and never depthwise (measured)."""
    x = torch.randn(1, 8, 33, 33)
    assert single_op(nn.Sequential(nn.Conv2d(8, 8, 3, stride=4)), "ethos-u65-256", x).placement is Placement.NPU
    padded = single_op(nn.Sequential(nn.Conv2d(8, 8, 3, stride=4, padding=1)), "ethos-u65-256", x)
    assert reasons(padded) == ["stride 4x4, ethos-u65-256 supports ≤ 3 for a padded window (≤ 32 without padding, not depthwise)"]
    depthwise = single_op(nn.Sequential(nn.Conv2d(8, 8, 5, stride=4, groups=8)), "ethos-u65-256", x)
    assert reasons(depthwise) == ["stride 4x4, ethos-u65-256 supports ≤ 3 for a depthwise window (≤ 32 without padding, not depthwise)"]
    assert single_op(nn.Sequential(nn.Conv2d(8, 8, 3, stride=4, padding=1)), "ethos-u85-256", x).placement is Placement.NPU
    unpadded = single_op(nn.Sequential(nn.Conv2d(8, 8, 1, stride=33)), "ethos-u65-256", torch.randn(1, 8, 67, 67))
    assert reasons(unpadded) == ["stride 33x33, ethos-u65-256 supports ≤ 32 without padding"]
    pool = single_op(nn.Sequential(nn.MaxPool2d(3, stride=4, padding=1)), "ethos-u65-256", x)
    assert reasons(pool) == ["stride 4x4, ethos-u65-256 supports ≤ 3 for a padded window (≤ 16 without padding)"]


def test_padded_average_pool_kernel():
    x = torch.randn(1, 8, 32, 32)
    assert single_op(nn.Sequential(nn.AvgPool2d(8, stride=1, padding=1)), "ethos-u65-256", x).placement is Placement.NPU
    assert single_op(nn.Sequential(nn.AvgPool2d(9, stride=1)), "ethos-u65-256", x).placement is Placement.NPU
    node = single_op(nn.Sequential(nn.AvgPool2d(9, stride=1, padding=1)), "ethos-u65-256", x)
    assert reasons(node) == ["kernel 9x9 with padding 1x1, ethos-u65-256 supports ≤ 8x8 with padding"]
    assert "pool without padding (kernels up to 256x256), or pad the input explicitly" in node.advice
    assert single_op(nn.Sequential(nn.AvgPool2d(9, stride=1, padding=1)), "ethos-u85-256", x).placement is Placement.NPU


def test_channels_beyond_65536():
    wide = single_op(nn.Sequential(nn.Conv2d(65_537, 1, 1)), "ethos-u65-256", torch.randn(1, 65_537, 1, 1))
    assert reasons(wide) == ["65537 channels, ethos-u65-256 supports ≤ 65536"]


def test_matmul_reduction():
    """Vela refuses a TOSA MATMUL summing 65,537 products on the U55 and U65 (measured), not on the U85."""

    class Product(nn.Module):
        def forward(self, x):
            return torch.matmul(x, x.transpose(1, 2))

    for width, target, placement in ((65_536, "ethos-u65-256", Placement.NPU), (65_537, "ethos-u85-256", Placement.NPU)):
        assert single_op(Product(), target, torch.randn(1, 2, width), name="model.matmul").placement is placement
    node = single_op(Product(), "ethos-u65-256", torch.randn(1, 2, 65_537), name="model.matmul")
    assert reasons(node) == ["matmul summing 65537 products per output, ethos-u65-256 supports ≤ 65536"]


def test_u55_refuses_what_its_npu_cannot_run():
    """On the U55 an op off the NPU is unsupported, with the reason; compile refuses the model, naming it, before any
    work (the check is the first step of a build)."""
    model = Wrapped(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"))).eval()
    x = torch.randn(1, 3, 8, 8)
    report = check_model(model, (x,), target="ethos-u55-128")
    node = report.node("model.1")
    assert node.placement is Placement.UNSUPPORTED and reasons(node)[-1] == NO_HOST
    assert report.node("model.0").placement is Placement.NPU
    assert report.summary.verdict == "not deployable: 1 unsupported op(s)"
    with pytest.raises(CompileError, match=f"Resize 'model.1/Resize' cannot run on ethos-u55-128: upsample_bilinear2d is not among .*; {NO_HOST}$"):
        compile_model(integer_model(model, x, "ethos-u55-128"), (x,), target="ethos-u55-128", out="unused.edgeq")
