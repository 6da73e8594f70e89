"""The logic of benchmarks/kernel_times.py (per-kernel time of an artifact, issue 34) on literal inputs: what each
kernel computes, medians over runs and the time by op kind. Nothing is timed here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_times.py"
spec = importlib.util.spec_from_file_location("kernel_times", PATH)
kernel_times = importlib.util.module_from_spec(spec)
sys.modules["kernel_times"] = kernel_times
spec.loader.exec_module(kernel_times)

TENSORS = {"a": {"shape": [1, 96, 28, 28]}, "b": {"shape": [1, 24, 56, 56]}, "c": {"shape": [1, 24, 56, 56]}}


def conv(kernel: str, output: str, groups: int, in_channels: int, out_channels: int, size: int, stride: int, macs: int) -> dict:
    attributes = {"kernel": [size, size], "groups": groups, "in_channels": in_channels, "out_channels": out_channels, "stride": [stride, stride]}
    return {"op": "conv2d", "kernel": kernel, "outputs": [output], "attributes": attributes, "macs": macs}


GRAPH = {
    "tensors": TENSORS,
    "ops": [
        conv("k_dw", "a", 96, 96, 96, 3, 2, 677_376),
        {"op": "relu", "kernel": "k_dw", "outputs": ["a"], "attributes": {}},
        conv("k_pw", "b", 1, 16, 24, 1, 1, 1_204_224),
        {"op": "add", "kernel": "k_add", "outputs": ["c"], "attributes": {}},
        {"op": "reshape", "kernel": None, "outputs": ["c"], "attributes": {}},
    ],
}


def test_ops_are_described_by_kind_channels_stride_and_rows():
    descriptions = [kernel_times.op_description(op, TENSORS) for op in GRAPH["ops"]]
    assert descriptions == ["dw 96->96 s2 @28", "relu", "1x1 16->24 s1 @56", "add", "reshape"]
    grouped = conv("k", "a", 4, 96, 96, 3, 1, 0)
    assert kernel_times.op_description(grouped, TENSORS) == "3x3 96->96 s1 @28"


def test_kernels_take_the_median_of_their_runs_slowest_first():
    runs = [{"k_dw": 10.0, "k_pw": 30.0, "vm.builtin.alloc_tensor": 2.0}, {"k_dw": 14.0, "k_pw": 20.0}, {"k_dw": 12.0, "k_pw": 25.0, "k_add": 3.0}]
    times = kernel_times.kernel_times(runs, GRAPH)
    assert [(k.kernel, k.microseconds) for k in times] == [("k_pw", 25.0), ("k_dw", 12.0), ("k_add", 0.0), ("vm.builtin.alloc_tensor", 0.0)]
    assert times[0].ops == ("1x1 16->24 s1 @56",) and times[1].ops == ("dw 96->96 s2 @28", "relu")
    assert times[0].gmacs == pytest.approx(1_204_224 / 25.0 / 1000)
    assert times[2].gmacs == 0.0 and times[3].ops == ()
    assert kernel_times.by_kind(times) == {"1x1": 25.0, "dw": 12.0, "add": 0.0, "vm": 0.0}
