"""Measuring this machine's CPU figures on edgeq's own compiled kernels, cached per CPU model.

Two calibration networks (:func:`_networks`) are quantized, compiled for this machine like any model, and run;
every kernel call is timed (:mod:`.measure`). The figures of :class:`~edgeq.targets.CpuFigures` are fitted in two
steps, each by non-negative least squares on the relative error (:func:`fit_nonnegative`):

1. The kernels of the large network that run on all cores give the rates: ``t = fixed + dense MACs / conv2d rate
   + depthwise MACs / depthwise rate + linear MACs / linear rate + output elements / requantized_outputs_per_s``
   (convolution and linear kernels; ``bytes read and written / memory_bytes_per_s`` for the others), the work
   divided by the register tiles' occupancy (:func:`~.estimate.tile_occupancy`). A rate that fits as zero (too
   fast to tell apart from ``fixed``) keeps the target's nominal value.
2. The kernels of the small network, which run on one core with their data in cache, give the fixed costs and the
   speed on one core: ``t = set-up + mac_set-up x [convolution or linear] + parallel_speedup x time at the rates
   of step 1`` (below 1 when small kernels run faster per MAC in cache than large ones on all cores).

``kernel_overhead`` is the set-up plus the VM's dispatch of a call, ``parallel_overhead`` what step 1's fixed cost
adds to the set-ups, and ``invocation_overhead`` the VM's cost of a call of the model; the VM's costs are timed on
idle kernels (:func:`~.measure.vm_overheads`).

Float figures are not measured (``float32_macs_per_s`` stays the target's). The result is cached as JSON in
``$EDGEQ_CACHE_DIR`` (default ``~/.cache/edgeq``), in ``cpu-<model>.json``, keyed by the CPU model, the thread
count and a fingerprint of the kernel generator's source (a change of kernels re-measures). Nothing here is
hard-coded about a CPU: it measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeq.compile.compiled_graph import CompiledGraph, Op
from edgeq.fileio import atomic_write, cache_dir, slug
from edgeq.perf.estimate import MAC_CLASSES, MAC_OPS, mac_class, tile_occupancy
from edgeq.perf.measure import measurement_threads, vm_overheads
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
    arch = host.llvm.mtriple.split("-")[0]
    if arch != host_arch():
        return host.perf, f"nominal ([perf] of {host.name}: this machine is {host_arch()})"
    calibration = None if recalibrate else cached_calibration()
    if calibration is None:
        calibration = calibrate(host)
    return calibration.figures, f"measured on {calibration.cpu} ({calibration.threads} threads, {calibration.measured_at})"


def calibrate(host: Target) -> Calibration:
    """Measure this machine's figures (about 10 s) and cache them (see the module docstring)."""
    started = time.perf_counter()
    logger.info("calibrating the performance estimator on this CPU (%s)", cpu_model())
    with tempfile.TemporaryDirectory(prefix="edgeq-calibrate-") as folder:
        figures = _measure_figures(host, Path(folder))
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
    return calibration


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

    A large one at 56x56: convolutions of reduction depths from 16 to 576 and depthwise convolutions of two window
    sizes (so that their MACs and their outputs are told apart), a residual add, linear layers, max and average
    pooling and a global average pool. A small one at 8x8 and 4x4 (3x3 dense, depthwise and 1x1 convolutions, max
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
            self.pool = nn.MaxPool2d(2)
            self.deep = nn.Conv2d(64, 128, 3, padding=1)
            self.wide_depthwise = nn.Conv2d(128, 128, 5, padding=2, groups=128)
            self.narrow = nn.Conv2d(128, 32, 1)
            self.wide = nn.Linear(32, 512)
            self.square = nn.Linear(512, 512)
            self.widest = nn.Linear(512, 2048)
            self.dequant = DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quant(x)
            x = torch.relu(self.pointwise(torch.relu(self.dense(x)))) + self.project(torch.relu(self.expand(x)))
            x = self.narrow(self.wide_depthwise(self.deep(self.pool(torch.relu(self.depthwise(x))))))
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
            x = self.depthwise(torch.relu(self.dense_again(torch.relu(self.dense(self.quant(x))))))
            x = self.pointwise(torch.relu(self.wider(self.pool(x))))
            return self.dequant(self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))

    return [(Large().eval(), torch.randn(1, 16, 56, 56)), (Small().eval(), torch.randn(1, 16, 8, 8))]


def fit_nonnegative(rows: list[list[float]], times: list[float]) -> list[float]:
    """Coefficients ``c >= 0`` of ``rows @ c ~ times`` minimising the squared relative error (so that small
    kernels weigh as much as large ones; a time is taken as at least 100 ns, the resolution of the measurement);
    a coefficient that comes out negative is dropped and the rest fitted again."""
    import numpy as np

    weights = 1 / np.maximum(np.asarray(times, dtype=float), 1e-7)
    matrix, target = np.asarray(rows, dtype=float) * weights[:, None], np.ones(len(times))
    active = np.ones(matrix.shape[1], dtype=bool)
    while True:
        solution = np.zeros(matrix.shape[1])
        solution[active] = np.linalg.lstsq(matrix[:, active], target, rcond=None)[0]
        if (solution >= 0).all():
            return solution.tolist()
        active &= solution > 0


Kernel = tuple[Op, CompiledGraph, float]
"""A timed kernel call: the op doing its main work, the compiled graph it is in, and the call's time (seconds)."""


def _timed_kernels(network: object, example: object, host: Target, path: Path) -> list[Kernel]:
    """Quantize ``network`` (calibrated on random data), compile it for ``host`` and time its kernel calls."""
    import torch

    from edgeq.compile import compile_model
    from edgeq.perf.measure import measure
    from edgeq.quantization import FakeQuantState, convert_fx, default_calib_qconfig, prepare_qat_fx, set_fake_quantize

    torch.manual_seed(0)
    prepared = prepare_qat_fx(network, default_calib_qconfig, example_inputs=(example,), target=host.name)
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn_like(example))
    result = compile_model(convert_fx(prepared), (example,), target=host.name, out=path, progress=lambda _: None)
    measured = measure(result.artifact, runs=5)
    kernels, seen = [], set()
    for op in result.graph.ops:
        places = measured.places(op.name)
        if places and places not in seen:
            seen.add(places)
            kernels.append((op, result.graph, measured.op_seconds(op.name)))
    return kernels


def _measure_figures(host: Target, folder: Path) -> CpuFigures:
    (large, large_input), (small, small_input) = _networks()
    on_all_cores = [k for k in _timed_kernels(large, large_input, host, folder / "large.edgeq") if k[0].parallel]
    on_one_core = [k for k in _timed_kernels(small, small_input, host, folder / "small.edgeq") if not k[0].parallel]

    def work(op: Op, graph: CompiledGraph) -> list[float]:
        """The op's work in the units of the rates (dense, depthwise and linear MACs, requantized outputs, bytes
        moved), over its register tiles' occupancy."""
        mac_op = op.op in MAC_OPS
        macs = [op.macs if mac_class(op) == name else 0 for name in MAC_CLASSES]
        outputs = math.prod(graph.tensors[op.outputs[0]].shape) if mac_op else 0
        moved = 0 if mac_op else op.bytes_in + op.bytes_out
        return [unit / tile_occupancy(op, graph) for unit in [*macs, outputs, moved]]

    fixed_on_all_cores, *per_unit = fit_nonnegative([[1.0, *work(op, graph)] for op, graph, _ in on_all_cores], [t for *_, t in on_all_cores])
    figures = host.perf
    nominal = [figures.conv2d_int8_macs_per_s, figures.depthwise_int8_macs_per_s, figures.linear_int8_macs_per_s, figures.requantized_outputs_per_s, figures.memory_bytes_per_s]
    rates = [1 / unit if unit > 0 else rate for unit, rate in zip(per_unit, nominal)]  # a rate that fits as 0 keeps the nominal one

    def seconds_on_all_cores(op: Op, graph: CompiledGraph) -> float:
        return sum(amount / rate for amount, rate in zip(work(op, graph), rates))

    setup, mac_setup, speedup = fit_nonnegative(
        [[1.0, float(op.op in MAC_OPS), seconds_on_all_cores(op, graph)] for op, graph, _ in on_one_core], [t for *_, t in on_one_core]
    )
    logger.debug("calibration fit: %s on all cores, set-up %s + %s, speed-up %s", [fixed_on_all_cores, *per_unit], setup, mac_setup, speedup)
    vm = vm_overheads()
    conv2d, depthwise, linear, outputs, memory = rates
    return CpuFigures(
        conv2d_int8_macs_per_s=conv2d,
        depthwise_int8_macs_per_s=depthwise,
        linear_int8_macs_per_s=linear,
        requantized_outputs_per_s=outputs,
        float32_macs_per_s=figures.float32_macs_per_s,
        memory_bytes_per_s=memory,
        kernel_overhead_ns=(setup + vm.per_call) * 1e9,
        mac_kernel_overhead_ns=mac_setup * 1e9,
        parallel_overhead_ns=max(fixed_on_all_cores - setup - mac_setup, 0.0) * 1e9,
        invocation_overhead_ns=vm.invocation * 1e9,
        parallel_speedup=speedup if speedup > 0 else figures.parallel_speedup,
    )
