"""Target files: the built-in ones load, malformed ones are clear errors naming file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeq.errors import TargetError
from edgeq.targets import ScaleRule, TargetKind, list_targets, load_target, target_names

VALID_NPU = """
name = "{name}"
kind = "npu"
description = "test npu"
host = "aarch64"

[hardware]
int8_macs_per_cycle = 64
clock_hz = 500_000_000
sram_bytes = 65536
dram_bandwidth_bytes_per_s = 1_000_000_000
vector_ops_per_cycle = 16
layer_overhead_cycles = 500
transition_overhead_ns = 10_000

[npu]
ops = ["add", "relu", "conv2d"]
max_tensor_bytes = 1048576
max_spatial = 256

[npu.conv2d]
max_kernel = 3
max_stride = 2
dilations = [1]
max_padding = 1
groups = "none"
channel_alignment = 8

[quantization]
scale_rule = "power_of_two"
concat_shares_input_scale = true
"""


def write(tmp_path: Path, text: str, name: str = "my-npu") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_builtin_targets():
    assert target_names() == ["aarch64", "ethos-u55-128", "ethos-u65-256", "ethos-u85-256", "npu-m", "npu-s", "x86_64", "x86_64-native"]
    targets = {t.name: t for t in list_targets()}
    assert targets["x86_64"].kind is TargetKind.CPU and targets["x86_64"].llvm.mtriple.startswith("x86_64")
    assert targets["aarch64"].llvm.mattr == ("+neon",)
    assert targets["npu-s"].quantization.scale_rule is ScaleRule.POWER_OF_TWO
    assert targets["npu-m"].quantization.scale_rule is ScaleRule.ANY
    assert targets["npu-s"].hardware.peak_int8_ops_per_s == 512_000_000_000
    for npu in ("npu-s", "npu-m"):
        assert targets[npu].host in targets and targets[targets[npu].host].kind is TargetKind.CPU


def test_load_by_path(tmp_path):
    target = load_target(write(tmp_path, VALID_NPU.format(name="my-npu")))
    assert target.name == "my-npu" and target.hardware.sram_bytes == 65536
    assert load_target(target) is target


def test_unknown_target_lists_known_ones():
    with pytest.raises(TargetError, match="unknown target 'npu-x'; known targets: aarch64, ethos-u55-128, ethos-u65-256, ethos-u85-256, npu-m"):
        load_target("npu-x")


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t + "\n[extra]\nfoo = 1\n", r"extra: Extra inputs are not permitted"),
        (lambda t: t.replace("clock_hz = 500_000_000", "clock_hz = 500_000_000\nclock_mhz = 500"), r"hardware.clock_mhz: Extra inputs"),
        (lambda t: t.replace("sram_bytes = 65536", 'sram_bytes = "64k"'), r"hardware.sram_bytes: Input should be a valid integer"),
        (lambda t: t.replace("clock_hz = 500_000_000", "clock_hz = 0"), r"hardware.clock_hz: Input should be greater than 0"),
        (lambda t: t.replace('"power_of_two"', '"log2"'), r"quantization.scale_rule: Input should be 'any' or 'power_of_two'"),
        (lambda t: t.replace("concat_shares_input_scale = true\n", ""), r"quantization.concat_shares_input_scale: Field required"),
        (lambda t: t.replace('host = "aarch64"\n', ""), r"an npu target needs host"),
        (lambda t: t.replace('host = "aarch64"\n', 'host = "aarch64"\nfirmware_host = "Cortex-M55"\n'), r"\(not both\)"),
        (lambda t: t.replace('ops = ["add", "relu", "conv2d"]', 'ops = ["add", "relu", "conv2d"]\nwhy_not = {add = "no"}'),
         r"\[npu.why_not\] says why the NPU lacks 'add', which npu.ops lists"),
        (lambda t: t.replace("[hardware]", "[hardware_]"), r"hardware_: Extra inputs are not permitted"),
        (lambda t: t.replace('ops = ["add", "relu", "conv2d"]', 'ops = ["add", "relu"]'), r"\[npu.conv2d\] describes an op that npu.ops does not list"),
        (lambda t: t.replace('ops = ["add", "relu", "conv2d"]', 'ops = ["add", "relu", "conv2d", "linear"]'),
         r"op 'linear' is listed in npu.ops but has no \[npu.linear\] section"),
        (lambda t: t.replace('ops = ["add", "relu", "conv2d"]', 'ops = ["add", "softmax"]'), r"npu.ops.1: Input should be 'conv2d', 'linear'"),
        (lambda t: t.replace('groups = "none"', 'groups = "some"'), r"npu.conv2d.groups: Input should be 'any', 'depthwise' or 'none'"),
        (lambda t: t.replace('name = "my-npu"', 'name = "other"'), r"name: 'other' differs from the file name 'my-npu'"),
        (lambda t: t + "\n[hardware\n", r"not valid TOML"),
        (lambda t: t.replace("clock_hz = 500_000_000", "clock_hz = 500_000_000\nelementwise_cycles = { addd = 4 }"),
         r"hardware.elementwise_cycles: elementwise_cycles names no op \['addd'\]"),
        (lambda t: t.replace("clock_hz = 500_000_000", "clock_hz = 500_000_000\nmicro_block = [2, 0, 8]"),
         r"hardware.micro_block.1: Input should be greater than 0"),
    ],
)
def test_malformed_target_files(tmp_path, edit, message):
    path = write(tmp_path, edit(VALID_NPU.format(name="my-npu")))
    with pytest.raises(TargetError, match=message) as error:
        load_target(path)
    assert str(error.value).startswith(str(path))


def test_missing_target_file(tmp_path):
    with pytest.raises(TargetError, match="no such file"):
        load_target(tmp_path / "absent.toml")
