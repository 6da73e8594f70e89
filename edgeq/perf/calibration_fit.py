"""The calibration networks, and the fit of a CPU's figures to the times of their kernels (:mod:`.calibrate` says
when to measure, and keeps what it measured)."""

from __future__ import annotations

import logging
from pathlib import Path

from edgeq.compile import CompileResult
from edgeq.compile.compiled_graph import CompiledGraph, GraphOp
from edgeq.compile.cpu_features import DOT_PRODUCTS
from edgeq.perf.estimate import CPU_RATES, cpu_work, mac_op, memory_priced, moves_blocked_tensors
from edgeq.perf.measure import Measurement
from edgeq.targets import CpuFigures, Target

logger = logging.getLogger(__name__)


def calibration_networks() -> list[tuple[object, object]]:
    """The calibration networks and their example inputs.

    A large one at 56x56: 3x3 and 1x1 convolutions of reduction depths from 16 to 864 and depthwise convolutions of
    two window sizes (so that their MACs, outputs and inputs are told apart), each kind also at stride 2 (inputs
    four times their outputs), a residual add, two 3x3 max pools of stride 2 (one over 64 channels, which the
    layout plan blocks, one over 18, which fill no block of any dot product and stay NCHW: each memory rate has a
    kernel to fit it), a global average pool and linear layers.
    A small one at 8x8 and 4x4 (3x3 dense convolutions with a residual add, depthwise and 1x1 convolutions, max
    pooling, a global average pool, a linear layer): kernels small enough to run on one core, on data that stays in
    cache between runs, as a small model's does.
    """
    import torch
    from torch import nn

    from edgeq.quantization import DeQuantStub, QuantStub

    class Large(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = QuantStub()
            self.dense = nn.Conv2d(16, 64, 3, padding=1)
            self.pointwise = nn.Conv2d(64, 64, 1)
            self.expand = nn.Conv2d(16, 96, 1)
            self.project = nn.Conv2d(96, 64, 1)
            self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
            self.pool = nn.MaxPool2d(3, 2, padding=1)
            self.narrow_branch = nn.Conv2d(64, 18, 1)
            self.narrow_pool = nn.MaxPool2d(3, 2, padding=1)
            self.narrow_join = nn.Conv2d(18, 64, 1)
            self.strided_depthwise = nn.Conv2d(64, 64, 3, 2, padding=1, groups=64)
            self.deep = nn.Conv2d(64, 128, 3, padding=1)
            self.wide_depthwise = nn.Conv2d(128, 128, 5, padding=2, groups=128)
            self.strided_pointwise = nn.Conv2d(128, 96, 1, 2)
            self.strided_dense = nn.Conv2d(96, 64, 3, 2, padding=1)
            self.narrow = nn.Conv2d(64, 32, 1)
            self.wide = nn.Linear(32, 512)
            self.square = nn.Linear(512, 512)
            self.widest = nn.Linear(512, 2048)
            self.dequant = DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quant(x)
            x = torch.relu(self.pointwise(torch.relu(self.dense(x)))) + self.project(torch.relu(self.expand(x)))
            x = torch.relu(self.depthwise(x))
            narrow = self.narrow_join(self.narrow_pool(self.narrow_branch(x)))
            x = self.wide_depthwise(self.deep(self.pool(x) + self.strided_depthwise(x) + narrow))
            x = self.narrow(self.strided_dense(self.strided_pointwise(x)))
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
            return self.dequant(self.widest(self.square(self.wide(x))))

    class Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = QuantStub()
            self.dense = nn.Conv2d(16, 16, 3, padding=1)
            self.dense_again = nn.Conv2d(16, 16, 3, padding=1)
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pool = nn.MaxPool2d(2)
            self.wider = nn.Conv2d(16, 32, 3, padding=1)
            self.pointwise = nn.Conv2d(32, 32, 1)
            self.linear = nn.Linear(32, 10)
            self.dequant = DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quant(x)
            x = self.depthwise(torch.relu(self.dense_again(torch.relu(self.dense(x))) + x))
            x = self.pointwise(torch.relu(self.wider(self.pool(x))))
            return self.dequant(self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))

    return [(Large().eval(), torch.randn(1, 16, 56, 56)), (Small().eval(), torch.randn(1, 16, 8, 8))]


def fit_nonnegative(rows: list[list[float]], times: list[float]) -> list[float]:
    """Coefficients ``c >= 0`` of ``rows @ c ~ times`` minimising the squared relative error (so that small
    kernels weigh as much as large ones; the error of a time below 1 us is taken relative to 1 us: below that, the
    instrument hook's cost subtracted from each call, about as much, dominates it); a coefficient that comes out
    negative is dropped and the rest fitted again, and one whose column is all zero (a work no kernel does) is 0."""
    import numpy as np

    measured = np.asarray(times, dtype=float)
    weights = 1 / np.maximum(measured, 1e-6)
    matrix, target = np.asarray(rows, dtype=float) * weights[:, None], measured * weights
    active = (matrix != 0).any(axis=0)
    while True:
        solution = np.zeros(matrix.shape[1])
        solution[active] = np.linalg.lstsq(matrix[:, active], target, rcond=None)[0]
        if (solution >= 0).all():
            return solution.tolist()
        active &= solution > 0


Kernel = tuple[list[GraphOp], CompiledGraph, float]
"""Timed kernel calls: the ops running in them (the first doing its main work), the compiled graph they are in,
and the calls' time (seconds)."""


def compiled_network(network: object, example: object, host: Target, path: Path) -> CompileResult:
    """``network`` quantized (calibrated on random data) and compiled for ``host`` into ``path``."""
    import torch

    from edgeq.compile import compile_model
    from edgeq.quantization import FakeQuantState, convert_fx, default_calib_qconfig, prepare_qat_fx, set_fake_quantize

    torch.manual_seed(0)
    prepared = prepare_qat_fx(network, default_calib_qconfig, example_inputs=(example,), target=host.name)
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn_like(example))
    return compile_model(convert_fx(prepared), (example,), target=host.name, out=path, progress=lambda _: None)


def _timed_kernels(graph: CompiledGraph, measured: Measurement) -> list[Kernel]:
    """The kernel calls of ``graph``'s measurement, with the ops that run in them (:meth:`Measurement.call_groups`)."""
    return [(ops, graph, seconds) for ops, seconds in measured.call_groups(graph)]


def _fastest(amounts: list[list[float]], times: list[float], column: int, nominal: float) -> float:
    """The rate of a work (``column`` of ``amounts``) whose cost fitted as zero, too fast to tell apart from the
    rest: the fastest any kernel doing it ran at (its work over its whole time: a bound the work cannot beat); the
    target's ``nominal`` rate if no kernel does it. The nominal rates are far off on some CPUs: 1x1 convolutions at
    6 G MACs/s made mobilenet_v2's estimate 15x too slow where VNNI runs them at over 300 G."""
    observed = [row[column] / seconds for row, seconds in zip(amounts, times) if row[column] > 0 and seconds > 0]
    return max(observed, default=nominal)


def fitted_figures(
    host: Target, large: tuple[CompiledGraph, Measurement], small: tuple[CompiledGraph, Measurement], invocation: float
) -> CpuFigures:
    """The figures fitted on the calibration networks' kernels (graph and measurement of each), with the VM's
    ``invocation`` cost (seconds); ``host``'s nominal figures where a work is not measured."""
    (large_graph, large_measured), (small_graph, small_measured) = large, small
    on_all_cores = [k for k in _timed_kernels(large_graph, large_measured) if k[0][0].parallel]
    on_one_core = [k for k in _timed_kernels(small_graph, small_measured) if not k[0][0].parallel]

    def work(ops: list[GraphOp], graph: CompiledGraph) -> list[float]:
        """A kernel's work in the units of the rates: its ops' :func:`~.estimate.cpu_work`, then the bytes its
        first op moves (not a MAC kernel), on NCHW tensors or on blocked ones."""
        compute = [sum(amounts) for amounts in zip(*(cpu_work(op, graph, DOT_PRODUCTS[graph.dot_product]) for op in ops))]
        moved = ops[0].bytes_in + ops[0].bytes_out if memory_priced(ops[0]) else 0
        blocked = moves_blocked_tensors(ops[0])
        return [*compute, 0 if blocked else moved, moved if blocked else 0]

    amounts = [work(ops, graph) for ops, graph, _ in on_all_cores]
    times = [t for *_, t in on_all_cores]
    fixed_on_all_cores, *per_unit = fit_nonnegative([[1.0, *row] for row in amounts], times)
    nominal = [getattr(host.perf, rate) for rate in [*CPU_RATES, "memory_bytes_per_s", "blocked_memory_bytes_per_s"]]
    rates = [1 / unit if unit > 0 else _fastest(amounts, times, column, rate) for column, (unit, rate) in enumerate(zip(per_unit, nominal))]

    def seconds_on_all_cores(ops: list[GraphOp], graph: CompiledGraph) -> float:
        return sum(amount / rate for amount, rate in zip(work(ops, graph), rates))

    setup, mac_setup, speedup = fit_nonnegative(
        [[1.0, float(mac_op(ops[0])), seconds_on_all_cores(ops, graph)] for ops, graph, _ in on_one_core], [t for *_, t in on_one_core]
    )
    logger.debug("calibration fit: %s on all cores, set-up %s + %s, speed-up %s", [fixed_on_all_cores, *per_unit], setup, mac_setup, speedup)
    unseen = small_measured.latency_s - sum(call.seconds for call in small_measured.calls) - invocation
    dispatch = max(unseen / len(small_measured.calls), 0.0)  # what a call costs outside its timed interval
    *compute_rates, memory, blocked_memory = rates
    return CpuFigures(
        **dict(zip(CPU_RATES, compute_rates)),
        float32_macs_per_s=host.perf.float32_macs_per_s,
        memory_bytes_per_s=memory,
        blocked_memory_bytes_per_s=blocked_memory,
        kernel_overhead_ns=(setup + dispatch) * 1e9,
        mac_kernel_overhead_ns=mac_setup * 1e9,
        parallel_overhead_ns=max(fixed_on_all_cores - setup - mac_setup, 0.0) * 1e9,
        invocation_overhead_ns=invocation * 1e9,
        parallel_speedup=speedup if speedup > 0 else host.perf.parallel_speedup,
    )
