"""Measuring this machine's CPU figures on edgeq's own compiled kernels, cached per CPU model.

Two calibration networks (:func:`_networks`) are quantized, compiled for this machine like any model, and run in
the same interleaved rounds; every kernel call is timed (:mod:`.measure`). The figures of
:class:`~edgeq.targets.CpuFigures` are fitted in two steps, each by non-negative least squares on the relative
error (:func:`fit_nonnegative`):

1. The kernels of the large network that run on all cores give the rates: ``t = fixed + Σ work / rate`` over
   :data:`~.estimate.CPU_RATES` (each kernel's ops' :func:`~.estimate.cpu_work`: MACs by class, requantized
   outputs, packed inputs), and ``bytes read and written / memory_bytes_per_s`` for kernels that are not
   convolutions or linear layers (``blocked_memory_bytes_per_s`` where the layout plan gave them blocked tensors:
   the max pool between convolutions, vectorized over a block's channels). A rate that fits as zero (too fast to
   tell apart from the rest) takes the fastest any kernel doing that work ran at (:func:`_fastest`).
2. The kernels of the small network, which run on one core with their data in cache, give the fixed costs and the
   speed on one core: ``t = set-up + mac_set-up x [convolution or linear] + parallel_speedup x time at the rates
   of step 1`` (below 1 when small kernels run faster per MAC in cache than large ones on all cores).

``invocation_overhead`` is the VM's cost of a call of the model, timed on idle kernels
(:func:`~.measure.vm_invocation`); ``kernel_overhead`` the set-up plus what the small network's latency leaves
after its timed calls and the invocation, per call (the VM's dispatch, outside each call's timed interval);
``parallel_overhead`` what step 1's fixed cost adds to the set-ups. :func:`calibrate_alongside` times other
artifacts in the same rounds, so that a machine whose speed drifts prices them at the speed they ran at.

Float figures are not measured (``float32_macs_per_s`` stays the target's). The result is cached as JSON in
``$EDGEQ_CACHE_DIR`` (default ``~/.cache/edgeq``), in ``cpu-<model>.json``, keyed by the CPU model, the thread
count and a fingerprint of the kernel generator's source (a change of kernels re-measures). Nothing here is
hard-coded about a CPU: it measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeq.compile import CompileResult
from edgeq.compile.compiled_graph import CompiledGraph, Op
from edgeq.compile.cpu_features import DOT_PRODUCTS
from edgeq.fileio import atomic_write, cache_dir, slug
from edgeq.perf.estimate import CPU_RATES, MAC_OPS, cpu_work, memory_priced, moves_blocked_tensors
from edgeq.perf.measure import Measurement, measure_together, measurement_threads, vm_invocation
from edgeq.targets import CpuFigures, Target

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Calibration:
    """This machine's measured CPU figures, and what they were measured with.

    Attributes:
        cpu: the CPU model (``AMD EPYC 7B13``), as the OS names it.
        arch: ``x86_64`` or ``aarch64``.
        threads: the kernels' thread count.
        fingerprint: of the kernel generator's source; figures of other kernels are stale.
        figures: the measured figures (``float32_macs_per_s`` is the target's nominal one).
        measured_at: UTC time of the measurement.
        seconds: how long calibration took.
    """

    cpu: str
    arch: str
    threads: int
    fingerprint: str
    figures: CpuFigures
    measured_at: str
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "figures": self.figures.model_dump()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Calibration:
        return cls(**{**data, "figures": CpuFigures.model_validate(data["figures"])})


def host_arch() -> str:
    """This machine's architecture as edgeq names it."""
    return {"arm64": "aarch64", "AMD64": "x86_64"}.get(platform.machine(), platform.machine())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor name."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "CPU part"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def kernel_fingerprint() -> str:
    """A hash of the source that generates edgeq's kernels (lowering, pipeline, kernels, schedules, code
    generation), of the source that measures them (this module and :mod:`.measure`) and of TVM's version."""
    import tvm

    from edgeq import compile as compiler
    from edgeq.perf import measure

    digest = hashlib.sha256(tvm.__version__.encode())
    for source in [*sorted(Path(compiler.__file__).parent.rglob("*.py")), Path(__file__), Path(measure.__file__)]:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def cache_path() -> Path:
    """Where this CPU's calibration is cached."""
    return cache_dir() / f"cpu-{slug(cpu_model())}.json"


def cached_calibration() -> Calibration | None:
    """The cached calibration of this CPU, if it is still valid (same CPU, threads and kernels)."""
    path = cache_path()
    try:
        calibration = Calibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as error:
        logger.warning("%s: unreadable calibration cache (%s); measuring again", path, error)
        return None
    current = (cpu_model(), host_arch(), measurement_threads(), kernel_fingerprint())
    if (calibration.cpu, calibration.arch, calibration.threads, calibration.fingerprint) != current:
        logger.info("%s: measured for other kernels or threads; measuring again", path)
        return None
    return calibration


def host_figures(host: Target, recalibrate: bool = False) -> tuple[CpuFigures, str]:
    """The figures that cost ``host``'s layers, and where they come from.

    On a machine of the host's architecture they are measured (cached; ``recalibrate`` measures again);
    elsewhere they are the target's nominal ``[perf]`` figures.

    Returns:
        (figures, ``"measured on <cpu>"`` or ``"nominal (<target file>)"``).
    """
    if host.llvm.arch != host_arch():
        return host.perf, f"nominal ([perf] of {host.name}: this machine is {host_arch()})"
    calibration = None if recalibrate else cached_calibration()
    if calibration is None:
        calibration = calibrate(host)
    return calibration.figures, f"measured on {calibration.cpu} ({calibration.threads} threads, {calibration.measured_at})"


def calibrate(host: Target) -> Calibration:
    """Measure this machine's figures (about 10 s) and cache them (see the module docstring)."""
    return calibrate_alongside(host, [])[0]


def calibrate_alongside(host: Target, artifacts: Sequence[str | Path]) -> tuple[Calibration, list[Measurement]]:
    """:func:`calibrate`, measuring ``artifacts`` in the same rounds as the calibration networks
    (:func:`~.measure.measure_together`): on a machine whose speed drifts, the figures then hold for the
    speed the artifacts ran at (how the estimator's error is measured, benchmarks/perf_estimator_error.py).

    Returns:
        The calibration (cached), and the measurement of each artifact.
    """
    started = time.perf_counter()
    logger.info("calibrating the performance estimator on this CPU (%s)", cpu_model())
    with tempfile.TemporaryDirectory(prefix="edgeq-calibrate-") as folder:
        figures, measurements = _measure_figures(host, Path(folder), artifacts)
    calibration = Calibration(
        cpu=cpu_model(),
        arch=host_arch(),
        threads=measurement_threads(),
        fingerprint=kernel_fingerprint(),
        figures=figures,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.perf_counter() - started, 1),
    )
    save_calibration(calibration)
    return calibration, measurements


def save_calibration(calibration: Calibration) -> Path:
    """Cache ``calibration`` (:func:`cache_path`)."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        Path(temporary).write_text(json.dumps(calibration.to_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("calibration cached in %s", path)
    return path


def _networks() -> list[tuple[object, object]]:
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


Kernel = tuple[list[Op], CompiledGraph, float]
"""A timed kernel call: the ops running in it (the first doing its main work), the compiled graph they are in,
and the call's time (seconds)."""


def _compiled(network: object, example: object, host: Target, path: Path) -> CompileResult:
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
    """Each kernel call of ``graph``'s measurement, with the ops that run in it."""
    kernels: dict[tuple[tuple[str, int], ...], Kernel] = {}
    for op in graph.ops:
        places = measured.places(op.name)
        if places:
            kernels.setdefault(places, ([], graph, measured.op_seconds(op.name)))[0].append(op)
    return list(kernels.values())


def _fastest(amounts: list[list[float]], times: list[float], column: int, nominal: float) -> float:
    """The rate of a work (``column`` of ``amounts``) whose cost fitted as zero, too fast to tell apart from the
    rest: the fastest any kernel doing it ran at (its work over its whole time: a bound the work cannot beat); the
    target's ``nominal`` rate if no kernel does it. The nominal rates are far off on some CPUs: 1x1 convolutions at
    6 G MACs/s made mobilenet_v2's estimate 15x too slow where VNNI runs them at over 300 G."""
    observed = [row[column] / seconds for row, seconds in zip(amounts, times) if row[column] > 0 and seconds > 0]
    return max(observed, default=nominal)


def _measure_figures(host: Target, folder: Path, artifacts: Sequence[str | Path]) -> tuple[CpuFigures, list[Measurement]]:
    """The figures, fitted on the calibration networks' kernels, and the measurements of ``artifacts`` (timed in
    the same rounds)."""
    large, small = (_compiled(network, example, host, folder / f"{name}.edgeq") for name, (network, example) in zip(("large", "small"), _networks()))
    large_measured, small_measured, *measurements = measure_together([large.artifact, small.artifact, *artifacts], runs=15)
    on_all_cores = [k for k in _timed_kernels(large.graph, large_measured) if k[0][0].parallel]
    on_one_core = [k for k in _timed_kernels(small.graph, small_measured) if not k[0][0].parallel]

    def work(ops: list[Op], graph: CompiledGraph) -> list[float]:
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

    def seconds_on_all_cores(ops: list[Op], graph: CompiledGraph) -> float:
        return sum(amount / rate for amount, rate in zip(work(ops, graph), rates))

    setup, mac_setup, speedup = fit_nonnegative(
        [[1.0, float(ops[0].op in MAC_OPS), seconds_on_all_cores(ops, graph)] for ops, graph, _ in on_one_core], [t for *_, t in on_one_core]
    )
    logger.debug("calibration fit: %s on all cores, set-up %s + %s, speed-up %s", [fixed_on_all_cores, *per_unit], setup, mac_setup, speedup)
    invocation = vm_invocation()
    unseen = small_measured.latency_s - sum(call.seconds for call in small_measured.calls) - invocation
    dispatch = max(unseen / len(small_measured.calls), 0.0)  # what a call costs outside its timed interval
    *compute_rates, memory, blocked_memory = rates
    figures = CpuFigures(
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
    return figures, measurements
