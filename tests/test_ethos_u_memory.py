"""The Ethos-U estimator's memory model (edgeq/perf/npu_memory.py, docs/perf.md "NPU layers by blocks") by hand:
where feature maps live, what a memory moves for them in whole bursts, the DRAM read rate, the busier memory, the
first and last blocks no other work overlaps, and the weights a layer waits for."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edgeq.op_attrs import Conv2dAttrs
from edgeq.perf.npu_blocks import WeightDma, weight_dma, weight_transfer_cycles
from edgeq.perf.npu_memory import MemoryTraffic, block_latency_cycles, burst_factor, dram_read_rate, layer_traffic
from edgeq.targets import load_target

U55, U65, U85 = (load_target(name).hardware for name in ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256"))


@dataclass
class _Tensor:
    shape: tuple[int, ...]
    producer: str | None = None
    consumers: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:  # int8
        size = 1
        for n in self.shape:
            size *= n
        return size


@dataclass
class _Op:
    name: str
    inputs: list[str]
    outputs: list[str]
    weight_bytes: int
    region: str = "region0_npu"
    attributes: Conv2dAttrs | None = None
    op: str = "conv2d"
    bytes_in: int = 0
    bytes_out: int = 0


class _Graph:
    """What layer_traffic reads of a compiled graph: tensors (shape, bytes, producer, consumers) and ops' regions."""

    def __init__(self, tensors: dict[str, _Tensor], ops: list[_Op]) -> None:
        self.tensors = tensors
        self.ops = {op.name: op for op in ops}
        for op in ops:
            op.bytes_in = sum(tensors[t].bytes for t in op.inputs)
            op.bytes_out = sum(tensors[t].bytes for t in op.outputs)

    def op(self, name: str) -> _Op:
        return self.ops[name]


def _stem() -> _Graph:
    """resnet18's 7x7 stem at 224: a region's 3-channel input, 64 output channels cascaded into one reader."""
    tensors = {"image": _Tensor((1, 3, 224, 224), None, ["conv"]), "x": _Tensor((1, 64, 112, 112), "conv", ["pool"])}
    return _Graph(tensors, [_Op("conv", ["image"], ["x"], 9664), _Op("pool", ["x"], [], 0)])


def test_burst_factor_counts_whole_bursts():
    assert burst_factor(U65, 128, 3, U65.ifm_run_bytes) == 16  # 3 channels read as a run of 8 from 128-byte bursts
    assert burst_factor(U65, 128, 64, U65.ifm_run_bytes) == 4  # a run of 32
    assert burst_factor(U65, 128, 64, U65.ofm_run_bytes) == 8  # written in runs of 16
    assert burst_factor(U65, 32, 64, U65.ifm_run_bytes) == 1  # the SRAM's 32-byte burst: full
    assert burst_factor(U65, None, 3, None) == 1


def test_dram_read_rate_is_the_port_or_the_reads_in_flight():
    assert dram_read_rate(U65) == U65.dram_bandwidth_bytes_per_s == 3_750_000_000
    assert dram_read_rate(U85) == pytest.approx(1638 / 500 * 1e9)  # below its 12 GB/s port


def test_region_input_in_dram_under_a_dedicated_sram():
    """The U65 reads the region's image from the DRAM (4 reads: 64 output channels / 16; 16 bytes moved a byte) and
    writes the cascaded output to the SRAM (runs of 16 in 32-byte bursts); weights once from the DRAM."""
    graph = _stem()
    conv = graph.op("conv")
    traffic = layer_traffic(graph, conv, U65, 4, frozenset({"image"}))
    assert traffic == MemoryTraffic(sram_bytes=802_816 * 2, dram_bytes=150_528 * 4 * 16 + 9664, dram_read_bytes=150_528 * 4 * 16 + 9664, in_sram=False)
    assert traffic.seconds(U65) == pytest.approx(max(802_816 * 2 / 16e9, (150_528 * 64 + 9664) / 3.75e9))
    shared = layer_traffic(graph, conv, U55, 4, frozenset({"image"}))  # the U55's Shared_Sram: all in its SRAM
    assert shared.in_sram and shared.dram_bytes == 9664 and shared.sram_bytes == 150_528 * 4 * 4 + 802_816 * 2


def test_a_tensor_read_by_several_layers_stays_in_the_sram_only_if_held():
    """A residual input (and sum) of 196 KiB does not fit three times in the U65's 384 KiB: the add reads it from
    and writes its sum to the DRAM; ones of 98 KiB stay in the SRAM. The convolution's output, read by the add
    alone, is cascaded: in the SRAM either way."""
    for channels, in_sram in ((64, False), (128, True)):
        side = 56 if channels == 64 else 28
        tensors = {
            "skip": _Tensor((1, channels, side, side), "before", ["conv", "add"]),
            "y": _Tensor((1, channels, side, side), "conv", ["add"]),
            "sum": _Tensor((1, channels, side, side), "add", ["next", "add2"]),
        }
        ops = [
            _Op("before", [], ["skip"], 0),
            _Op("conv", ["skip"], ["y"], 0),
            _Op("add", ["skip", "y"], ["sum"], 0),
            _Op("next", ["sum"], [], 0),
            _Op("add2", ["sum"], [], 0),
        ]
        graph = _Graph(tensors, ops)
        traffic = layer_traffic(graph, graph.op("add"), U65, 1, frozenset())
        skip = tensors["skip"].bytes
        assert (traffic.dram_bytes == 0) is in_sram
        if not in_sram:  # read in runs of 32 and written in runs of 16 from 128-byte bursts; y in 32-byte ones
            assert traffic.dram_bytes == skip * 4 + skip * 8 and traffic.sram_bytes == skip


def test_first_and_last_blocks_are_not_overlapped():
    """The U65's stem in 4 blocks: a quarter of the image read from the DRAM after its 500-cycle latency, a quarter
    of the cascaded output written to the SRAM after 32 cycles; the U55's Shared_Sram reads the image from its
    SRAM too."""
    graph = _stem()
    conv = graph.op("conv")
    u65 = block_latency_cycles(graph, conv, U65, 4, frozenset({"image"}))
    assert u65 == pytest.approx(500 + 150_528 / 4 / 3.75 + 32 + 802_816 / 4 / 16)
    u55 = block_latency_cycles(graph, conv, U55, 4, frozenset({"image"}))
    assert u55 == pytest.approx(32 + 150_528 / 4 / 8 + 32 + 802_816 / 4 / 8)  # 8 bytes a cycle at 500 MHz


def _conv(in_channels: int, out_channels: int) -> Conv2dAttrs:
    return Conv2dAttrs(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, in_channels=in_channels, out_channels=out_channels)


def test_a_layer_waits_for_the_weights_the_command_before_leaves_to_bring():
    """Weights come from the DRAM at 3.75 bytes a cycle after 500 cycles, while the command before runs: whole
    where that leaves less than 1,000 cycles to wait, else the first 16 output channels (the rest while the layer
    runs, the DMA busy); a region's first layer streams its weights as it runs. A global average pool brings its
    channels' scales and biases."""
    graph = _Graph({"y": _Tensor((1, 64, 1, 1), "pool")}, [_Op("pool", [], ["y"], 0, op="global_avg_pool2d")])
    conv = _Op("conv", [], [], 9664, attributes=_conv(in_channels=32, out_channels=32))
    whole = 9664 / 3.75 + 500
    assert weight_transfer_cycles(graph, conv, U65) == pytest.approx(whole)
    assert weight_dma(graph, conv, U65, 2500.0) == WeightDma(pytest.approx(whole - 2500), 0.0)  # 577 cycles to wait
    assert weight_dma(graph, conv, U65, 1e6) == WeightDma() and weight_dma(graph, conv, U65, None) == WeightDma()
    sliced = weight_dma(graph, conv, U65, 1000.0)  # whole, 2077 cycles would show: the first half first
    assert sliced == WeightDma(pytest.approx(9664 / 2 / 3.75 + 500 - 1000), pytest.approx(9664 / 2 / 3.75))
    pool = graph.op("pool")
    assert weight_transfer_cycles(graph, pool, U65) == pytest.approx(64 * 10 / 3.75 + 500)
    assert weight_transfer_cycles(graph, _Op("max", [], ["y"], 0, op="max_pool2d"), U65) == 0
