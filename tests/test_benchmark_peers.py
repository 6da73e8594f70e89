"""The logic of the peer benchmark (benchmarks/peers.py, issue 34) and of the kernel instruction count
(benchmarks/kernel_instructions.py): CPU-load arithmetic, the repeat of disturbed runs, ratios, MAC counts and the
inner-loop finder, on literal inputs. Nothing is timed here."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(path: Path):
    """A benchmark script as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


peers = load(BENCHMARKS / "peers.py")  # puts benchmarks/peers/ on the path: cpu_load imports from there
cpu_load = sys.modules["cpu_load"]
kernel_instructions = load(BENCHMARKS / "kernel_instructions.py")

PROC_STAT = """cpu  1000 50 300 8000 100 10 20 5 0 0
cpu0 500 25 150 4000 50 5 10 2 0 0
intr 12345
"""


def test_proc_stat_counts_busy_and_total_ticks(monkeypatch):
    monkeypatch.setattr(cpu_load.os, "sysconf", lambda name: 100)
    times = cpu_load.parse_proc_stat(PROC_STAT)
    assert (times.busy_s, times.total_s) == (13.85, 94.85)  # idle 8000 and iowait 100 ticks are not busy


def test_proc_stat_without_a_cpu_line_is_an_error():
    with pytest.raises(ValueError, match="no 'cpu ' line"):
        cpu_load.parse_proc_stat("intr 1\n")


def test_busy_cores_leave_out_the_measured_process():
    before, after = cpu_load.CpuTimes(10.0, 100.0), cpu_load.CpuTimes(13.0, 104.0)
    assert cpu_load.busy_cores(before, after, wall_s=2.0) == 1.5
    assert cpu_load.busy_cores(before, after, wall_s=2.0, own_cpu_s=2.8) == pytest.approx(0.1)
    assert cpu_load.busy_cores(before, after, wall_s=2.0, own_cpu_s=3.5) == 0.0  # tick rounding: never negative


def arguments(**settings: object) -> argparse.Namespace:
    return argparse.Namespace(**({"idle": 0.1, "attempts": 3, "idle_timeout": 1.0, "warmup": 1, "runs": 3} | settings))


def test_a_disturbed_run_is_repeated_until_one_is_quiet(monkeypatch):
    results = iter([{"times_ms": [9.0], "other_cores": 0.5}, {"times_ms": [5.0, 6.0, 4.0], "other_cores": 0.05}])
    monkeypatch.setattr(peers, "wait_until_idle", lambda *args, **kwargs: (True, 0.0))
    monkeypatch.setattr(peers, "run_once", lambda *args: next(results))
    measured = peers.Measurement()
    peers.measure(peers.PEERS["onnxruntime"], Path("m.onnx"), Path("x.npy"), arguments(), measured)
    assert (measured.round_medians, measured.repeated, measured.disturbed) == ([5.0], 1, 0)


def test_the_last_attempt_counts_and_is_marked_disturbed(monkeypatch):
    monkeypatch.setattr(peers, "wait_until_idle", lambda *args, **kwargs: (True, 0.0))
    monkeypatch.setattr(peers, "run_once", lambda *args: {"times_ms": [7.0], "other_cores": 0.3})
    measured = peers.Measurement()
    peers.measure(peers.PEERS["onnxruntime"], Path("m.onnx"), Path("x.npy"), arguments(attempts=2), measured)
    assert (measured.round_medians, measured.repeated, measured.disturbed) == ([7.0], 1, 1)


def test_median_of_round_medians_and_ratios_to_each_peer_and_the_best():
    measured = peers.Measurement([5.0, 3.0, 4.0])
    assert measured.median_ms == 4.0
    lines = peers.ratio_lines({"edgeq": 4.0, "ONNX Runtime": 5.0, "LiteRT": 8.0}, ["edgeq"])
    assert lines == ["edgeq: 0.80x of the best peer (ONNX Runtime); 0.80x of ONNX Runtime, 0.50x of LiteRT"]
    assert peers.ratio_lines({"edgeq": 4.0}, ["edgeq"]) == []


def test_engines_take_turns_in_a_rotating_order():
    assert [peers.rotated("abc", turn) for turn in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_multiply_accumulates_of_convolutions_and_linear_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    expected = 8 * 16 * 3 * 9 + 8 * 16 * 9 + 10 * 128
    assert peers.multiply_accumulates(model, torch.zeros(1, 3, 4, 4)) == expected


def test_unknown_engines_and_models_are_named():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown engine.*'tvm'; choose from edgeq, onnxruntime"):
        peers.engine_names("edgeq,tvm")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown torchvision classifier.*'resnet19'"):
        peers.model_names("resnet19")


def code(rows: str) -> list:
    """Instructions from ``address mnemonic operands`` rows."""
    parsed = []
    for row in rows.strip().splitlines():
        address, mnemonic, *operands = row.split(maxsplit=2)
        parsed.append(kernel_instructions.Instruction(int(address, 16), mnemonic, operands[0] if operands else ""))
    return parsed


def test_main_loop_of_an_aarch64_kernel_is_the_innermost_one_with_the_most_sdot():
    instructions = code("""
        10 mov x1, #0
        14 ld1r {v1.4s}, [x2]
        18 sdot v0.4s, v1.16b, v2.16b
        1c sdot v3.4s, v1.16b, v4.16b
        20 subs x3, x3, #1
        24 b.ne 14 <k+0x14>
        28 sdot v5.4s, v1.16b, v2.16b
        2c cbnz x1, 10 <k+0x10>
    """)
    loop = kernel_instructions.main_loop(instructions, "aarch64", "sdot")
    assert (loop.instructions, loop.dots, loop.macs) == (5, 2, 32)
    assert loop.per_mac == 5 / 32


def test_main_loop_of_an_x86_kernel_counts_zmm_dot_products():
    instructions = code("""
        100 vpbroadcastd (%rax),%zmm1
        106 vpdpbusd %zmm2,%zmm1,%zmm0
        10c add $0x4,%rax
        110 cmp %rcx,%rax
        113 jne 100 <k+0x100>
        115 jmp *%rdx
    """)
    loop = kernel_instructions.main_loop(instructions, "x86_64", "vpdpbusd")
    assert (loop.instructions, loop.dots, loop.macs) == (5, 1, 64)
    assert kernel_instructions.main_loop(instructions[:3], "x86_64", "vpdpbusd") is None  # no loop around it
