"""The performance estimator: hand-computed layer costs, transitions, report.json, bad inputs, and the CPU
calibration and its cache."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import pytest
import torch
from models import BilinearResizes, SmallCNN, Wrapped, integer_model
from torch import nn

import edgeq
from edgeq.compile import compile_model
from edgeq.compile.compiled_graph import CompiledGraphError
from edgeq.compile.cpu_features import DOT_PRODUCTS, dot_product, host_target
from edgeq.compile.layout_plan import is_blocked
from edgeq.errors import EdgeqError, TargetError
from edgeq.op_attrs import Conv2dAttrs, LinearAttrs, PoolAttrs
from edgeq.perf.calibrate import (
    Calibration,
    Timing,
    cached_calibration,
    calibrate_alongside,
    calibration_key,
    cpu_model,
    host_arch,
    host_figures,
    probe,
    probe_path,
    save_calibration,
)
from edgeq.perf.calibration_fit import _fastest, fit_nonnegative
from edgeq.perf.estimate import (
    CPU_RATES,
    cpu_work,
    fused_into_producer,
    host_dot_product,
    lane_occupancy,
    mac_class,
    mac_utilisation,
    memory_rate,
    spill_bytes,
)
from edgeq.perf.measure import hook_cost, measure
from edgeq.targets import TargetKind, list_targets, load_target

calibration_module = importlib.import_module("edgeq.perf.calibrate")  # the module (edgeq.perf.calibrate is also a function)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))


def _this_machines_cpu_target():
    return next(t for t in list_targets() if t.kind is TargetKind.CPU and t.llvm.mtriple.startswith(host_arch()))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """SmallCNN on npu-s, batch 2, 8x8: every op on the NPU."""
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    path = tmp_path_factory.mktemp("perf") / "small.edgeq"
    return compile_model(integer_model(SmallCNN().eval(), example, "npu-s"), (example,), out=path, simulate=True)


def test_npu_layer_costs_by_hand(small, tmp_path, monkeypatch):
    monkeypatch.setattr(calibration_module, "host_arch", lambda: "elsewhere")  # the host's nominal figures
    result = edgeq.perf_model(small.artifact, out_dir=tmp_path / "out")
    npu = load_target("npu-s").hardware
    layers = {layer.op.name: layer for layer in result.layers}
    conv = layers["conv1/Conv"]
    # 16 output channels fill the 16-wide array; a reduction of 1 x 3 x 3 = 9 uses 9 of its 256 / 16 = 16 lanes
    assert conv.utilisation == 9 / 16
    assert conv.compute_ms == pytest.approx(18432 / (256 * 9 / 16 * 1e9) * 1e3)
    assert conv.dram_bytes == 208 + 128  # weights and biases, and the program input read from DRAM
    assert conv.memory_ms == pytest.approx(336 / 3.2e9 * 1e3)
    assert conv.overhead_ms == pytest.approx(2000 / 1e9 * 1e3)
    assert conv.latency_ms == pytest.approx(conv.overhead_ms + max(conv.compute_ms, conv.memory_ms))
    assert conv.bound == "overhead" and conv.spill_bytes == 0 and conv.onchip_bytes == 128 + 2048 + 208
    relu = layers["conv1/Relu"]
    assert relu.fused and relu.bound == "fused" and relu.overhead_ms == 0 and relu.dram_bytes == 0
    pool = layers["pool/MaxPool"]
    assert pool.compute_ms == pytest.approx(2048 / (npu.vector_ops_per_cycle * 1e9) * 1e3)
    assert layers["flatten/Reshape"].latency_ms == 0 and layers["flatten/Reshape"].bound == "none"

    summary = result.summary
    host = load_target("aarch64").perf
    assert summary.invocation_ms == pytest.approx(host.invocation_overhead_ns * 1e-6)
    assert summary.latency_ms == pytest.approx(sum(layer.latency_ms for layer in result.layers) + summary.invocation_ms)
    assert summary.batch == 2 and summary.fps == pytest.approx(2 / (summary.latency_ms / 1e3))
    assert summary.macs == sum(op.macs for op in small.graph.ops) and summary.weight_bytes == 7672
    assert summary.mac_utilisation == pytest.approx(summary.macs / (summary.latency_ms / 1e3 * 256e9))
    assert result.transitions == [] and summary.cpu_ms == 0 and summary.npu_ms == pytest.approx(summary.latency_ms - summary.invocation_ms)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == json.loads(json.dumps(result.to_dict())) and report["summary"]["latency_ms"] == summary.latency_ms
    assert "nominal" in report["figures"]["cpu_source"] and len(report["layers"]) == len(small.graph.ops)
    brief = edgeq.perf_model(small.artifact, out_dir=tmp_path / "brief", layer_details=False)
    assert "layers" not in json.loads((tmp_path / "brief" / "report.json").read_text())
    assert brief.summary == summary


def test_cpu_fallback_and_transitions(tmp_path, monkeypatch):
    """perf_model compiles an integer model; the 7x7 stem falls back to the host, then the NPU takes over."""
    monkeypatch.setattr(calibration_module, "host_arch", lambda: "elsewhere")
    torch.manual_seed(0)
    example = torch.rand(1, 3, 16, 16)
    model = Wrapped(nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)))
    result = edgeq.perf_model(integer_model(model.eval(), example, "npu-s"), (example,), out_dir=tmp_path, target="npu-s")
    cpu = load_target("aarch64").perf
    stem = result.layers[0]
    assert stem.op.placement == "CPU" and stem.bound == "compute"
    outputs = 8 * 8 * 8
    assert not stem.op.parallel  # 75 k multiply-accumulates: one core, no thread-pool wake-up to pay, at 1 / 3.5 of the rates
    one_core = cpu.parallel_speedup
    assert one_core == 3.5
    inputs = 3 * 16 * 16  # packed into the kernel's blocked layout
    work = stem.op.macs / cpu.conv2d_int8_macs_per_s + outputs / cpu.requantized_outputs_per_s + inputs / cpu.packed_inputs_per_s
    host_dot = host_dot_product(result.graph, load_target("npu-s"))  # aarch64 without dotprod, not this machine's
    assert host_dot.name == "plain" and result.graph.dot_product == dot_product(host_target()).name
    assert stem.utilisation == lane_occupancy(stem.op, host_dot) == 1.0  # 8 lanes x 1 deep
    assert stem.compute_ms == pytest.approx(one_core * work * 1e3)
    # an int8 MAC kernel's rates price what it packs and writes: no memory bound of its own (docs/perf.md)
    assert stem.memory_ms == 0 and stem.dram_bytes == 3 * 256 + outputs + stem.op.weight_bytes
    assert stem.overhead_ms == pytest.approx((cpu.kernel_overhead_ns + cpu.mac_kernel_overhead_ns) * 1e-6)
    (transition,) = result.transitions
    assert (transition.from_region, transition.to_region, transition.bytes) == ("region0_cpu", "region1_npu", outputs)
    npu = load_target("npu-s").hardware
    assert transition.latency_ms == pytest.approx((npu.transition_overhead_ns * 1e-9 + outputs / npu.dram_bandwidth_bytes_per_s) * 1e3)
    summary = result.summary
    assert summary.latency_ms == pytest.approx(summary.npu_ms + summary.cpu_ms + summary.transition_ms + cpu.invocation_overhead_ns * 1e-6)


_Op = dataclasses.make_dataclass("Op", ["op", "attributes"])
"""What the estimator's formulas read of a compiled graph's op."""


def _conv(out_channels: int, in_channels: int, groups: int, kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> _Op:
    return _Op("conv2d", Conv2dAttrs(kernel, (1, 1), (0, 0), dilation, groups, in_channels, out_channels))


def test_spill_and_utilisation_formulas():
    assert spill_bytes(100, 50, 1000) == 0
    assert spill_bytes(1000, 100, 1000) == 1000  # activations stream through DRAM, weights stay
    assert spill_bytes(2000, 800, 1000) == 2000 + 800 * (math.ceil(2000 / 500) - 1)  # weights fetched per tile
    hardware = load_target("npu-m").hardware
    assert mac_utilisation(_conv(48, 64, 1, (3, 3)), hardware, 32) == (48 / 64) * (576 / 576)
    assert mac_utilisation(_conv(32, 32, 32, (3, 3)), hardware, 32) == 1 * (9 / 64)  # depthwise


def test_lane_occupancy_of_cpu_layers():
    """Channels pad to the dot product's blocks: output channels to its lanes, input channels to its depth."""
    avx2, vnni = DOT_PRODUCTS["avx2-pmaddwd"], DOT_PRODUCTS["vnni"]  # 8 lanes x 2 deep, 16 x 4
    stem = _conv(64, 3, 1, (7, 7))
    assert lane_occupancy(stem, avx2) == 3 / 4 and lane_occupancy(stem, vnni) == 3 / 4
    odd = _conv(20, 24, 1, (1, 1))
    assert lane_occupancy(odd, avx2) == 20 / 24 and lane_occupancy(odd, vnni) == 20 / 32
    depthwise = _conv(72, 72, 72, (3, 3))
    assert lane_occupancy(depthwise, avx2) == 72 / 80  # 16 channels per vector
    assert lane_occupancy(depthwise, vnni) == 72 / 80 * 3 / 4  # 16 channels x 4 taps of a row
    dilated = _conv(72, 72, 72, (3, 3), dilation=(2, 2))
    assert lane_occupancy(dilated, vnni) == 72 / 80  # int16 products, one tap at a time
    grouped = _conv(48, 48, 6, (3, 3))  # 8 channels a group
    assert lane_occupancy(grouped, vnni) == 8 / 16 and lane_occupancy(grouped, avx2) == 1.0
    uneven = _conv(48, 48, 2, (3, 3))  # 24: blocks span 2 groups
    assert lane_occupancy(uneven, vnni) == 24 / 48
    assert lane_occupancy(_Op("linear", LinearAttrs(in_features=32, out_channels=10)), vnni) == 10 / 16
    assert lane_occupancy(_Op("max_pool2d", PoolAttrs((2, 2), (2, 2), (0, 0))), avx2) == 1.0


def test_cpu_work_of_each_op_kind(tmp_path):
    """A MAC kernel's work is its MACs under its class, its outputs requantized and its inputs packed; a residual
    add fused into the convolution before it requantizes its outputs too; a pool moves bytes."""
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    graph = compile_model(integer_model(SmallCNN().eval(), example, "x86_64"), (example,), out=tmp_path / "s.edgeq").graph
    kinds = {op.op: op for op in reversed(graph.ops)}  # the first op of each kind
    conv, add, pool, linear = kinds["conv2d"], kinds["add"], kinds["max_pool2d"], kinds["linear"]
    elements = 2 * 16 * 8 * 8
    dot = DOT_PRODUCTS[graph.dot_product]
    filled = lane_occupancy(conv, dot)  # the stem: 1 input channel of a block
    assert cpu_work(conv, graph, dot) == [elements * 9 / filled, 0, 0, 0, elements / filled, 2 * 1 * 8 * 8 / filled]
    assert fused_into_producer(add, graph) and cpu_work(add, graph, dot) == [0, 0, 0, 0, elements, 0]
    assert not fused_into_producer(pool, graph) and cpu_work(pool, graph, dot) == [0] * 6
    filled = lane_occupancy(linear, dot)
    assert cpu_work(linear, graph, dot) == [0, 0, 0, 2 * 32 * 10 / filled, 2 * 10 / filled, 2 * 32 / filled]
    assert mac_class(_conv(16, 8, 1, (1, 1))) == "pointwise"
    assert mac_class(_conv(16, 8, 1, (3, 3))) == "conv2d"
    assert mac_class(_conv(16, 16, 4, (1, 1))) == "pointwise"
    assert mac_class(_conv(16, 16, 16, (3, 3))) == "depthwise"


@pytest.mark.parametrize("whole_blocks", [True, False])
def test_pools_the_layout_plan_blocks_move_bytes_at_the_blocked_rate(whole_blocks, tmp_path):
    """A max pool between convolutions is blocked where its channels fill whole blocks (edgeq/compile/layout_plan.py):
    it moves a block's channels per vector, at ``blocked_memory_bytes_per_s``; otherwise NCHW, at
    ``memory_bytes_per_s``."""
    lanes = dot_product(host_target()).lanes
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    model = integer_model(SmallCNN(width=lanes if whole_blocks else lanes + 4).eval(), example, "x86_64")
    graph = compile_model(model, (example,), out=tmp_path / "s.edgeq").graph
    pool = next(op for op in graph.ops if op.op == "max_pool2d")
    cpu = load_target("x86_64").perf
    assert is_blocked(pool.kernel) == whole_blocks
    assert memory_rate(pool, cpu) == (cpu.blocked_memory_bytes_per_s if whole_blocks else cpu.memory_bytes_per_s)


def test_bad_inputs_are_clear_errors(small, tmp_path):
    fake = tmp_path / "model.edgeq"
    fake.write_text("not an artifact")
    with pytest.raises(CompiledGraphError, match="model.edgeq: not an edgeq artifact"):
        edgeq.perf_model(fake, out_dir=tmp_path)
    with pytest.raises(TargetError, match="unknown target 'npu-x'; known targets"):
        edgeq.perf_model(small.artifact, out_dir=tmp_path, target="npu-x")
    with pytest.raises(EdgeqError, match="small.edgeq: compiled for npu-s, not npu-m; compile the model for npu-m"):
        edgeq.perf_model(small.artifact, out_dir=tmp_path, target="npu-m")
    assert not (tmp_path / "report.json").exists()


def test_a_rate_too_fast_to_fit_takes_the_fastest_its_kernels_ran_at():
    """A work whose cost fits as zero gets the largest work / time of the kernels doing it (no kernel did it
    faster), not the target's nominal rate; the nominal rate only when no kernel does it."""
    amounts = [[0.0, 10.0], [4.0, 0.0], [2.0, 5.0]]
    times = [1.0, 2.0, 0.5]
    assert _fastest(amounts, times, 0, nominal=99.0) == 4.0  # 2 / 0.5 beats 4 / 2
    assert _fastest(amounts, times, 1, nominal=99.0) == 10.0
    assert _fastest([[0.0], [0.0]], [1.0, 1.0], 0, nominal=99.0) == 99.0


def test_fit_of_kernels_faster_than_a_microsecond_keeps_their_times():
    """Kernels of 0.1-0.6 us (a small network on a fast CPU) are fitted at their times, their errors weighed as
    those of 1 us: a fit to 1 us made a set-up cost ten times too high. A work no kernel does gets 0, not a
    coefficient out of rounding noise (whose inverse rate would be absurd)."""
    rows = [[1.0, mac, work, 0.0] for mac, work in ((0, 0.0), (0, 0.1e-6), (1, 0.2e-6), (1, 0.4e-6), (1, 0.1e-6))]
    times = [0.1e-6 + 0.2e-6 * mac + work for _, mac, work, _ in rows]
    assert fit_nonnegative(rows, times) == pytest.approx([0.1e-6, 0.2e-6, 1.0, 0.0], rel=1e-9, abs=1e-15)


def test_calibration_cache_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    host = _this_machines_cpu_target()
    assert cached_calibration(host) is None
    calibration = Calibration(**calibration_key(host), figures=host.perf, probe_s=1e-3, measured_at="2026-01-01T00:00:00Z", seconds=1.0)
    probe_artifact = tmp_path / "probe.edgeq"
    probe_artifact.write_bytes(b"a stand-in: the probe is not run here")
    save_calibration(calibration, probe_artifact)
    assert cached_calibration(host) == calibration
    monkeypatch.setattr(calibration_module, "probe", lambda artifact: Timing(1e-3, 0.0))  # the probe confirms the cache
    source = f"measured on {cpu_model()} ({host.name}: {calibration.dot_product} kernels, 3 threads, 2026-01-01T00:00:00Z)"
    assert host_figures(host) == (host.perf, source)
    monkeypatch.setenv("TVM_NUM_THREADS", "4")
    assert cached_calibration(host) is None  # measured with another thread count
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    save_calibration(dataclasses.replace(calibration, fingerprint="other kernels"), probe_artifact)
    assert cached_calibration(host) is None  # stale: the kernels changed


@pytest.mark.flow
def test_calibration_measures_this_machine(small, monkeypatch):
    """About 15-30 s: compiles and runs the calibration networks, and an artifact in the same runs. Cached however
    busy the machine is (other tests may run): whether a busy machine's figures are cached is tested with
    synthetic times (test_hardening_perf.py)."""
    monkeypatch.setattr(calibration_module, "BUSY_SHARE", 1.0)
    monkeypatch.setattr(calibration_module, "ROUNDS_TOLERANCE", math.inf)
    host = _this_machines_cpu_target()
    calibration, (measured,) = calibrate_alongside(host, [small.artifact])
    figures = calibration.figures
    assert all(getattr(figures, rate) > 1e6 for rate in [*CPU_RATES, "memory_bytes_per_s", "blocked_memory_bytes_per_s"])
    assert figures.invocation_overhead_ns > 0 and figures.parallel_speedup > 0  # below 1 when small kernels run in cache
    assert cached_calibration(host) == calibration and calibration.seconds > 0 and calibration.probe_s > 0
    assert probe(probe_path(host.name)).seconds > 0  # the cached probe runs
    assert measured.latency_s > 0 and {(c.region, c.index) for c in measured.calls} == {(op.region, i) for op in small.graph.ops for i in op.calls}


def test_measured_kernel_calls_map_to_ops(small):
    hook = hook_cost()  # the instrument hook's share of a timed call, subtracted from each by its arguments
    assert 0 < hook.seconds(3) <= hook.seconds(8) < 1e-4
    measured = measure(small.artifact, runs=1)
    assert measured.latency_s > 0 and len(measured.calls) == 7
    assert measured.ops["conv1/Relu"] == measured.ops["conv1/Conv"] and "conv2d" in measured.ops["conv1/Conv"][0].kernel
    assert measured.places("conv1/Relu") == measured.places("conv1/Conv") == ((measured.ops["conv1/Conv"][0].region, measured.ops["conv1/Conv"][0].index),)
    assert {(c.region, c.index) for c in measured.calls} == {(op.region, i) for op in small.graph.ops for i in op.calls}  # every call is an op's
    groups = measured.call_groups(small.graph)  # each call in one group: the fit's and the benchmark's kernels
    assert sum(seconds for _, seconds in groups) == pytest.approx(sum(c.seconds for c in measured.calls))
    pool, flatten = small.graph.op("adaptive_avg_pool2d/GlobalAveragePool"), small.graph.op("flatten/Reshape")
    assert len(pool.calls) == 2 and (not flatten.calls or any(pool in ops and flatten in ops for ops, _ in groups))


def test_an_op_built_from_several_kernels_maps_to_all_of_them(tmp_path):
    """A bilinear resize is gathers then weighted sums per axis: each resize owns its chain of calls, up to the one
    that requantizes; its first step may run in the kernel making its input (TVM fuses it there)."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 7, 6)
    result = compile_model(integer_model(BilinearResizes().eval(), example, "x86_64"), (example,), out=tmp_path / "b.edgeq", simulate=True)
    measured = measure(result.artifact, runs=1)
    resizes = [op for op in result.graph.ops if op.op == "upsample_bilinear2d"]
    assert len(resizes) == 6
    for op in resizes:
        calls = measured.ops[op.name]
        assert len(calls) > 1 and op.kernel == calls[-1].kernel and "right_shift" in op.kernel
        made_by = result.graph.op(result.graph.tensors[op.inputs[0]].producer)
        own = [call for call in calls[:-1] if call.index not in made_by.calls]
        assert own and all("right_shift" not in call.kernel for call in own)
    owned = [(c.region, c.index) for calls in measured.ops.values() for c in calls]
    assert len(set(owned)) == len(measured.calls)  # every call belongs to an op
    assert measured.op_seconds(resizes[0].name) == sum(c.seconds for c in measured.ops[resizes[0].name])
