"""Measuring this machine's CPU figures on edgeq's own compiled kernels, cached per CPU model.

A small calibration network (:func:`_network`: dense and depthwise convolutions, linear layers, pooling) is
quantized, compiled for this machine like any model, and run; the figures of :class:`~edgeq.targets.CpuFigures`
are a non-negative least-squares fit of the kernel calls' times (:mod:`.measure`) to ``kernel_overhead +
parallel_overhead x [runs on all cores] + dense MACs / conv2d rate + depthwise MACs / depthwise rate + linear MACs
/ linear rate + output elements / requantized_outputs_per_s`` (convolution and linear kernels) or ``... + bytes
read and written / memory_bytes_per_s`` (the others: pooling, requantization).

A figure the fit cannot tell apart from the overhead (a rate so high its term fits as zero) keeps the target's
nominal value.

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

from edgeq.fileio import atomic_write, cache_dir, slug
from edgeq.perf.estimate import MAC_CLASSES, MAC_OPS, mac_class
from edgeq.perf.measure import measurement_threads
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
    """Measure this machine's figures (about 10-30 s) and cache them (see the module docstring)."""
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


def _network() -> object:
    """The calibration network: convolutions of reduction depths from 16 to 576 and depthwise convolutions of two
    window sizes (so that their MACs and their outputs are told apart), a residual add, linear layers, max and
    average pooling and a global average pool."""
    import torch
    from torch import nn

    from edgeq.quantization import DeQuantStub, QuantStub

    class Calibration(nn.Module):
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
            self.shrink = nn.AvgPool2d(7)
            self.tiny = nn.Conv2d(32, 32, 1)
            self.wide = nn.Linear(32, 512)
            self.square = nn.Linear(512, 512)
            self.dequant = DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quant(x)
            x = torch.relu(self.pointwise(torch.relu(self.dense(x)))) + self.project(torch.relu(self.expand(x)))
            x = self.narrow(self.wide_depthwise(self.deep(self.pool(torch.relu(self.depthwise(x))))))
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.tiny(self.shrink(x)), 1), 1)
            return self.dequant(self.square(self.wide(x)))

    return Calibration().eval()


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


def _measure_figures(host: Target, folder: Path) -> CpuFigures:
    import torch

    from edgeq.compile import compile_model
    from edgeq.perf.measure import measure
    from edgeq.quantization import FakeQuantState, convert_fx, default_calib_qconfig, prepare_qat_fx, set_fake_quantize

    torch.manual_seed(0)
    example = torch.randn(1, 16, 56, 56)
    prepared = prepare_qat_fx(_network(), default_calib_qconfig, example_inputs=(example,), target=host.name)
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn_like(example))
    result = compile_model(convert_fx(prepared), (example,), target=host.name, out=folder / "calibration.edgeq", progress=lambda _: None)
    measured = measure(result.artifact, runs=5)
    graph = result.graph
    seconds = {}  # the time of the kernel calls of each op that does the calls' main work, by calls
    anchors = {}  # that op, by calls
    for op in graph.ops:
        calls = tuple((c.region, c.index) for c in measured.ops.get(op.name, ()))
        if calls and calls not in anchors:
            anchors[calls], seconds[calls] = op, measured.op_seconds(op.name)

    def row(op) -> list[float]:
        outputs = math.prod(graph.tensors[op.outputs[0]].shape)
        mac_op = op.op in MAC_OPS
        macs = [op.macs if mac_class(op) == name else 0 for name in MAC_CLASSES]
        moved = 0 if mac_op else op.bytes_in + op.bytes_out
        return [1.0, float(op.parallel), *macs, outputs if mac_op else 0, moved]

    overhead, parallel, per_dense, per_grouped, per_linear, per_output, per_byte = fit_nonnegative(
        [row(op) for op in anchors.values()], [seconds[k] for k in anchors]
    )
    logger.debug("calibration fit: %s", [overhead, parallel, per_dense, per_grouped, per_linear, per_output, per_byte])

    def rate(per_unit: float, nominal: float) -> float:
        return 1 / per_unit if per_unit > 0 else nominal  # too fast to tell apart from the overhead

    figures = host.perf
    return CpuFigures(
        conv2d_int8_macs_per_s=rate(per_dense, figures.conv2d_int8_macs_per_s),
        depthwise_int8_macs_per_s=rate(per_grouped, figures.depthwise_int8_macs_per_s),
        linear_int8_macs_per_s=rate(per_linear, figures.linear_int8_macs_per_s),
        requantized_outputs_per_s=rate(per_output, figures.requantized_outputs_per_s),
        float32_macs_per_s=figures.float32_macs_per_s,
        memory_bytes_per_s=rate(per_byte, figures.memory_bytes_per_s),
        kernel_overhead_ns=overhead * 1e9,
        parallel_overhead_ns=parallel * 1e9,
    )
