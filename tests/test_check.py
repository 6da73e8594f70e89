"""check_model: one test per rule (a model that trips it, asserting placement, reason and advice), summaries of
torchvision models on every target, every kind of input, JSON and the command line."""

from __future__ import annotations

import io
import json
from collections import OrderedDict

import onnx
import pytest
import torch
import torch.nn.functional as F
from models import BatchNorms1d, SmallCNN, Wrapped, calibrate, float_onnx, integer_model, ort_quantize_static, random_batches, torchvision_model
from onnx import helper
from rich.console import Console
from torch import nn

from edgeq.check import Placement, check_model
from edgeq.cli import EXIT_ERROR, EXIT_NOT_DEPLOYABLE, main
from edgeq.errors import EdgeqError, TargetError
from edgeq.export import save_torchscript, to_onnx, trace
from edgeq.quantization import default_calib_int32_output_qconfig, default_calib_qconfig


def image(size: int = 16, channels: int = 8) -> torch.Tensor:
    return torch.randn(1, channels, size, size)


def single_op(body: nn.Module, target: str, example: torch.Tensor | None = None, name: str = "model.0"):
    """Check a float model QuantStub -> body -> DeQuantStub and return the report of ``name``."""
    example = image() if example is None else example
    report = check_model(Wrapped(body).eval(), (example,), target=target)
    return report.node(name)


def assert_cpu(node, message: str, advice: str | None = None) -> None:
    assert node.placement is Placement.CPU
    assert any(message in r.message for r in node.reasons), [r.message for r in node.reasons]
    if advice is not None:
        assert any(advice in a for a in node.advice), node.advice


# ---- one rule at a time ---------------------------------------------------------------------------------------


def test_kernel_too_large():
    node = single_op(nn.Sequential(nn.Conv2d(8, 16, 7, padding=2)), "npu-s")
    assert_cpu(node, "kernel 7x7, npu-s supports ≤ 5x5", "two stacked 3x3 convolutions")
    assert single_op(nn.Sequential(nn.Conv2d(8, 16, 7, padding=2)), "npu-m").placement is Placement.NPU


def test_stride_too_large():
    assert_cpu(single_op(nn.Sequential(nn.Conv2d(8, 16, 3, stride=4)), "npu-s"), "stride 4x4, npu-s supports ≤ 2")


def test_padding_too_large():
    assert_cpu(single_op(nn.Sequential(nn.Conv2d(8, 16, 3, padding=3)), "npu-s"), "padding 3x3, npu-s supports ≤ 2")


def test_dilation_unsupported():
    node = single_op(nn.Sequential(nn.Conv2d(8, 16, 3, dilation=2)), "npu-s")
    assert_cpu(node, "dilation 2x2, npu-s supports 1")
    assert single_op(nn.Sequential(nn.Conv2d(8, 16, 3, dilation=2)), "npu-m").placement is Placement.NPU


def test_grouped_convolution():
    node = single_op(nn.Sequential(nn.Conv2d(8, 16, 3, groups=2)), "npu-s")
    assert_cpu(node, "groups=2 convolution, npu-s supports depthwise only", "use groups=1, or depthwise")
    assert single_op(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)), "npu-s").placement is Placement.NPU


def test_channel_alignment_is_advice():
    node = single_op(nn.Sequential(nn.Conv2d(8, 30, 3)), "npu-s")
    assert node.placement is Placement.NPU and not node.reasons
    assert "out channels 30: pad to 32 for full MAC use" in node.advice
    assert single_op(nn.Sequential(nn.Conv2d(8, 32, 3)), "npu-s").advice == []


def test_op_not_on_the_npu():
    class Transpose(nn.Module):
        def forward(self, x):
            return x.transpose(2, 3)

    assert_cpu(single_op(Transpose(), "npu-s", name="transpose"), "transpose is not among npu-s's ops")
    assert single_op(Transpose(), "npu-m", name="transpose").placement is Placement.NPU


def test_upsample_factor():
    node = single_op(nn.Sequential(nn.Upsample(scale_factor=4)), "npu-s")
    assert_cpu(node, "upsample x4x4, npu-s supports x2", "chain upsamples by x2")


def test_linear_too_wide():
    node = single_op(nn.Sequential(nn.Linear(4096, 16)), "npu-s", example=torch.randn(1, 4096))
    assert_cpu(node, "in_features 4096, npu-s supports ≤ 2048")


def test_spatial_size_too_large():
    node = single_op(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), "npu-s", example=torch.randn(1, 3, 1024, 700))
    assert_cpu(node, "spatial size 1024x700, npu-s supports ≤ 640", "reduce the input resolution")


def test_tensor_too_large():
    node = single_op(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1)), "npu-s", example=torch.randn(1, 3, 320, 320))
    assert_cpu(node, "tensor of 6.2 MiB per image, npu-s addresses ≤ 4.0 MiB")


def test_tensor_size_counts_bytes_not_elements(tmp_path):
    """A conv with an int32 output of 1.06 M elements: 1.06 MiB as int8 (on the NPU), 4.25 MiB as int32 (not)."""
    body, example = nn.Sequential(nn.Conv2d(3, 17, 3, padding=1)), torch.randn(1, 3, 256, 256)
    assert single_op(body, "npu-s", example=example).placement is Placement.NPU
    int32_output = {"": default_calib_qconfig, "module_name": {"model.0": default_calib_int32_output_qconfig}}
    int_model = integer_model(Wrapped(body).eval(), example, "npu-s", qconfig=int32_output)
    report = check_model(to_onnx(int_model, (example,), tmp_path / "int32.onnx"), target="npu-s")
    assert_cpu(next(n for n in report.nodes if n.record.op == "conv2d"), "tensor of 4.2 MiB per image")


def test_weights_larger_than_sram_is_advice():
    node = single_op(nn.Sequential(nn.Conv2d(256, 256, 3)), "npu-s", example=image(8, 256))
    assert node.placement is Placement.NPU
    assert any("weights 576.0 KiB are streamed from DRAM" in a for a in node.advice)


def test_batchnorm1d_is_a_linear_layers_or_a_depthwise_conv_on_the_npu():
    """A float model's report names the BatchNorm1d folded into a linear layer in its op, and places the ones alone as
    depthwise convs between reshapes, every op on npu-s's NPU."""
    report = check_model(BatchNorms1d().eval(), (torch.randn(2, 4, 6),), target="npu-s")
    assert report.node("fc1").record.source_op == "Linear+BatchNorm1d+ReLU" and report.node("fc2").record.source_op == "Linear+BatchNorm1d"
    alone = [report.node(name).record for name in ("norm_sequence", "norm_mixed", "norm_alone")]
    expected = [("conv2d", 4, (2, 4, 6, 1)), ("conv2d", 4, (2, 4, 8, 1)), ("conv2d", 12, (2, 12, 1, 1))]
    assert [(r.op.value, r.attrs.groups, r.input_shapes[0]) for r in alone] == expected
    assert {n.placement for n in report.nodes} == {Placement.NPU}


def test_op_edgeq_cannot_quantize_runs_in_float_on_the_cpu_with_advice():
    report = check_model(Wrapped(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Mish())).eval(), (image(),), target="npu-s")
    node = report.node("model.1")
    assert node.placement is Placement.CPU and node.where == "CPU (float)"
    assert node.reasons[0].rule == "not_quantized" and "no integer implementation" in node.reasons[0].message
    assert node.advice == ["mish is not on npu-s: relu is"]
    assert report.deployable and report.summary.verdict == "runs with CPU fallback: 1 op(s) on the aarch64 host"
    on_cpu = check_model(Wrapped(nn.Mish()).eval(), (image(),), target="x86_64").node("model")
    assert on_cpu.where == "CPU (float)" and "no integer implementation" in on_cpu.reasons[0].message


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_is_a_table_on_npus_with_tables_and_integer_on_the_cpu_elsewhere(approximate):
    model = Wrapped(nn.Sequential(nn.Conv2d(8, 8, 1), nn.GELU(approximate=approximate))).eval()
    op = "gelu" if approximate == "none" else "gelu_tanh"
    assert check_model(model, (image(),), target="npu-m").node("model.1").where == "NPU"
    node = check_model(model, (image(),), target="npu-s").node("model.1")
    assert node.record.op == op and node.where == "CPU" and node.reasons[0].rule == "op_not_on_npu"
    assert node.advice == [f"{op} is not on npu-s: relu is"]


def test_table_activation_lacking_on_the_npu_falls_back_with_advice():
    report = check_model(Wrapped(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardswish())).eval(), (image(),), target="npu-s")
    node = report.node("model.1")
    assert node.placement is Placement.CPU and node.reasons[0].rule == "op_not_on_npu"
    assert node.advice == ["hardswish is not on npu-s: relu6 is"]
    assert check_model(Wrapped(nn.Hardswish()).eval(), (image(),), target="npu-m").node("model").placement is Placement.NPU


def test_float_code_outside_the_region_is_unsupported():
    class Softmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Wrapped(nn.Conv2d(8, 8, 1))

        def forward(self, x):
            return F.softmax(self.body(x), dim=1)

    node = check_model(Softmax().eval(), (image(),), target="npu-m").node("softmax")
    assert node.placement is Placement.UNSUPPORTED
    assert "float code outside the QuantStub/DeQuantStub region" in node.reasons[0].message


def test_scales_must_be_powers_of_two_on_npu_s():
    torch.manual_seed(0)
    int_model = integer_model(SmallCNN().eval(), torch.rand(2, 1, 8, 8), "npu-m")
    node = check_model(int_model, (torch.rand(2, 1, 8, 8),), target="npu-s").node("conv1/Conv")
    assert_cpu(node, "is not a power of two; npu-s requantizes by shifts only", "prepare the model with target='npu-s'")
    assert check_model(int_model, (torch.rand(2, 1, 8, 8),)).summary.verdict == "NPU-ready: every op runs on npu-m"


class _Branches(nn.Module):
    """cat of a conv output that also feeds another op: its scale cannot be shared with the concat."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        with torch.no_grad():
            self.a.weight.mul_(0.02)  # a far smaller range than the concat: even power-of-two scales differ

    def forward(self, x):
        a = self.a(x)
        return torch.cat([a, self.b(x)], 1) + torch.cat([a, a], 1)


def test_concat_scales_differ():
    torch.manual_seed(0)
    shared = check_model(integer_model(Wrapped(_Branches()).eval(), image(), "npu-s"), (image(),))
    node = shared.node("model.cat/Concat")
    assert_cpu(node, "cannot rescale while concatenating", "inputs used only by the concat then share its scale")
    rescaling = check_model(integer_model(Wrapped(_Branches()).eval(), image(), "npu-m"), (image(),))
    node = rescaling.node("model.cat/Concat")
    assert node.placement is Placement.NPU
    assert "a shared scale avoids a requantize" in node.advice


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, "npu-s")
    folder = tmp_path_factory.mktemp("check")
    return int_model, example, to_onnx(int_model, (example,), folder / "small.onnx")


def _append_op(path, op_type: str, out_path):
    model = onnx.load(str(path))
    output = model.graph.output[0]
    node = helper.make_node(op_type, [output.name], ["extra"], name=f"extra/{op_type}")
    model.graph.node.append(node)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [2, 10]))
    onnx.save(model, str(out_path))
    return out_path


def test_float_op_in_a_qdq_file_falls_back(small_onnx, tmp_path):
    _, _, path = small_onnx
    report = check_model(_append_op(path, "Softmax", tmp_path / "softmax.onnx"))
    assert_cpu(report.node("extra/Softmax"), "Softmax is not quantized in the file: it runs in float")
    assert report.summary.verdict == "runs with CPU fallback: 1 op(s) on the aarch64 host"
    assert report.summary.transitions == 1


def test_op_without_any_implementation_is_unsupported(small_onnx, tmp_path):
    _, _, path = small_onnx
    node = check_model(_append_op(path, "Celu", tmp_path / "celu.onnx"), target="x86_64").node("extra/Celu")
    assert node.placement is Placement.UNSUPPORTED
    assert node.reasons[0].message == "Celu has no converter in TVM's ONNX frontend"


def test_asymmetric_third_party_file_is_not_npu_ready(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    float_path = float_onnx(model, image(), tmp_path / "float.onnx")
    ort_quantize_static(float_path, tmp_path / "q.onnx", random_batches((1, 8, 16, 16), count=2))
    report = check_model(tmp_path / "q.onnx", target="npu-m")
    assert report.summary.ops_on_npu == 0 and report.summary.verdict.startswith("runs with CPU fallback")
    conv = next(n for n in report.nodes if n.record.op == "conv2d")
    assert_cpu(conv, "is uint8 with zero point", "ActivationSymmetric=True")
    assert "npu-m needs int8 with zero point 0" in conv.reasons[0].message
    assert check_model(tmp_path / "q.onnx", target="x86_64").summary.verdict == "runs on the x86_64 CPU"
    with pytest.raises(TargetError, match=r"q.onnx: the model records no target; name one \(target='npu-s' in Python"):
        check_model(tmp_path / "q.onnx")


# ---- every kind of input ----------------------------------------------------------------------------------------


def test_every_kind_of_model_gives_the_same_placement(small_onnx, tmp_path):
    int_model, example, path = small_onnx
    from_file = check_model(path)
    script = trace(int_model, (example,))
    pt_path = save_torchscript(int_model, (example,), tmp_path / "int_model.pt")
    for report in (check_model(int_model, [example]), check_model(script, [example], advice=True), check_model(pt_path)):
        assert [(n.record.name, n.placement) for n in report.nodes] == [(n.record.name, n.placement) for n in from_file.nodes]
        assert report.target.name == "npu-s"
    prepared = calibrate(SmallCNN().eval(), example, "npu-s", lambda: torch.rand(2, 1, 8, 8))
    assert check_model(prepared, (example,)).summary.verdict == "NPU-ready: every op runs on npu-s"


def test_uncalibrated_prepared_model_is_checked_without_scales():
    from edgeq.quantization import prepare_qat_fx

    prepared = prepare_qat_fx(SmallCNN(), example_inputs=(torch.rand(1, 1, 8, 8),), target="npu-s")
    report = check_model(prepared, (torch.rand(1, 1, 8, 8),))
    assert report.deployable and any("scales not checked" in note for note in report.notes)


def test_missing_target_and_inputs_are_clear_errors(small_onnx):
    with pytest.raises(EdgeqError, match="a float model needs a target"):
        check_model(SmallCNN(), (torch.rand(1, 1, 8, 8),))
    with pytest.raises(EdgeqError, match=r"give example_inputs=\(x,\)"):
        check_model(SmallCNN(), target="npu-s")


def test_linear_over_more_axes_is_one_record_that_the_next_op_names():
    """A linear layer over a 4-D tensor is exported as MatMul + bias Add: one record, and the op after it reads
    that record (not the Add)."""
    torch.manual_seed(0)
    example = image(5, 3)
    model = Wrapped(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Linear(5, 6), nn.ReLU())).eval()
    report = check_model(integer_model(model, example, "npu-m"), (example,))
    conv, linear, relu = (n.record for n in report.nodes)
    assert (conv.op, linear.op, relu.op) == ("conv2d", "linear", "relu")
    assert linear.inputs == [conv.name] and relu.inputs == [linear.name]


def test_aliases_leave_no_record():
    model = Wrapped(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Identity(), nn.ReLU(), nn.Identity())).eval()
    report = check_model(model, (image(),), target="npu-s")
    assert [(n.record.name, n.record.op, n.record.inputs) for n in report.nodes] == [
        ("model.0", "conv2d", ["input:x"]),
        ("model.2", "relu", ["model.0"]),
    ]


def test_advice_can_be_left_out():
    report = check_model(Wrapped(nn.Conv2d(8, 30, 3)).eval(), (image(),), target="npu-s", advice=False)
    assert report.node("model").advice == [] and "advice" not in str(report)
    assert "advice" in str(check_model(Wrapped(nn.Conv2d(8, 30, 3)).eval(), (image(),), target="npu-s"))


# ---- torchvision summaries on every target ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"])
def torchvision_float(request):
    return request.param, torchvision_model(request.param)


@pytest.mark.parametrize("target", ["x86_64", "aarch64", "npu-m", "npu-s"])
def test_torchvision_summaries(torchvision_float, target):
    name, model = torchvision_float
    torch.manual_seed(0)
    example = torch.randn(1, 3, 64, 64)
    report = check_model(integer_model(model, example, target), (example,))
    summary = report.summary
    assert report.deployable and summary.ops > 40 and summary.macs > 1e6
    if target in ("x86_64", "aarch64"):
        assert summary.verdict == f"runs on the {target} CPU" and summary.ops_on_cpu == summary.ops
    elif target == "npu-m" or name == "mobilenet_v2":
        assert summary.verdict == f"NPU-ready: every op runs on {target}"
        assert (summary.npu_subgraphs, summary.transitions, summary.npu_mac_share) == (1, 0, 1.0)
    elif name == "resnet18":  # its 7x7 stem does not fit npu-s
        assert summary.ops_on_cpu == 1 and report.node("model.conv1/Conv").reasons[0].rule == "max_kernel"
        assert (summary.npu_subgraphs, summary.transitions) == (1, 1) and 0.9 < summary.npu_mac_share < 1.0
    else:  # shufflenet's channel shuffles (transpose) and splits fall back on npu-s
        fallbacks = {n.record.op for n in report.nodes if n.placement is Placement.CPU}
        assert fallbacks == {"transpose", "split"}
        assert summary.npu_subgraphs > 10 and summary.transitions > 20 and summary.npu_mac_share == 1.0


def test_float_resnet18_before_training():
    report = check_model(torchvision_model("resnet18"), (torch.randn(1, 3, 224, 224),), target="npu-s")
    assert_cpu(report.node("model.conv1"), "kernel 7x7, npu-s supports ≤ 5x5")
    assert report.summary.ops_on_cpu == 1 and round(report.summary.macs / 1e6) == 1814


# ---- JSON and the command line ----------------------------------------------------------------------------------


def test_json_report(small_onnx):
    _, _, path = small_onnx
    data = json.loads(check_model(path, target="npu-m").to_json())
    assert data["target"] == "npu-m" and data["summary"]["deployable"] is True
    assert {"name", "op", "source_op", "placement", "macs", "output_shape", "reasons", "advice"} <= set(data["nodes"][0])


def test_command_line(small_onnx, tmp_path, capsys):
    _, _, path = small_onnx
    assert main(["check", str(path), "--json", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["verdict"] == "NPU-ready: every op runs on npu-s"
    assert "NPU coverage: " in capsys.readouterr().out
    celu = _append_op(path, "Celu", tmp_path / "celu.onnx")
    assert main(["check", str(celu)]) == EXIT_NOT_DEPLOYABLE
    assert main(["check", str(tmp_path / "absent.onnx")]) == EXIT_ERROR
    assert "absent.onnx: no such file" in capsys.readouterr().err
    assert main(["targets"]) == 0
    assert "npu-s         npu  small edge NPU" in capsys.readouterr().out


def _mixed_report():
    """A report with a long op name, reasons and advice (a 7x7 kernel, a grouped convolution, 30 channels)."""
    body = nn.Sequential(OrderedDict(
        stem_convolution_with_a_long_name_for_a_narrow_terminal=nn.Conv2d(8, 30, 7, padding=3),
        grouped=nn.Conv2d(30, 30, 3, padding=1, groups=3),
    ))
    return check_model(Wrapped(body).eval(), (image(),), target="npu-s")


def _rendered(report, width: int) -> list[str]:
    buffer = io.StringIO()
    report.render(Console(file=buffer, width=width, color_system=None))
    return buffer.getvalue().splitlines()


def test_narrow_output_is_a_list_with_whole_names_and_every_word():
    report = _mixed_report()
    lines = _rendered(report, 80)
    assert all(len(line) <= 80 for line in lines) and not any("┃" in line for line in lines)
    words = " ".join(lines).split()
    for node in report.nodes:
        assert [node.placement.value, node.record.name, node.record.source_op] in [line.split() for line in lines]
        for text in [r.message for r in node.reasons] + node.advice:
            assert " ".join(text.split()) in " ".join(words), text
    assert " ".join(words).endswith(" ".join(" ".join(report.summary_lines()).split()))


def test_wide_output_is_a_table():
    report = _mixed_report()
    lines = _rendered(report, 200)
    assert lines[1].startswith("┏") and "why not NPU" in lines[2] and "advice" in lines[2]
    assert any(report.nodes[0].record.name in line and "CPU" in line for line in lines)


def test_piped_check_follows_columns(small_onnx, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["check", str(small_onnx[2])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(len(line) <= 80 for line in lines)


def test_supported_ops_page_is_current():
    from pathlib import Path

    from edgeq.check.supported_ops import PAGE, supported_ops_markdown

    page = Path(__file__).resolve().parent.parent / PAGE
    assert page.read_text() == supported_ops_markdown() + "\n", "regenerate: python scripts/supported_ops.py"
