"""Measuring this machine's CPU figures on edgeq's own compiled kernels, cached per CPU model.

A small calibration network (dense 3x3 and 1x1 convolutions, a depthwise convolution, a linear layer, max
pooling and a global average pool) is quantized, compiled for this machine like any model, and run; each
kernel's time (:mod:`.measure`) gives a figure of :class:`~edgeq.targets.CpuFigures`:

- ``kernel_overhead_ns``: the median time of the kernels that move under 4 KiB;
- ``*_int8_macs_per_s``: the MACs of the convolution (dense or depthwise) or linear kernels over their time less
  the overhead;
- ``memory_bytes_per_s``: bytes read and written by the pooling kernels over their time less the overhead.

Float figures are not measured (``float32_macs_per_s`` stays the target's). The result is cached as JSON in
``$EDGEQ_CACHE_DIR`` (default ``~/.cache/edgeq``), in ``cpu-<model>.json``, keyed by the CPU model, the thread
count and a fingerprint of the kernel generator's source (a change of kernels re-measures). Nothing here is
hard-coded about a CPU: it measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeq.fileio import atomic_write
from edgeq.targets import CpuFigures, Target

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "EDGEQ_CACHE_DIR"
SMALL_KERNEL_BYTES = 4096
"""Kernels moving fewer bytes than this measure the fixed cost of a call."""


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


def _threads() -> int:
    return int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)


def kernel_fingerprint() -> str:
    """A hash of the source that generates edgeq's kernels (lowering and code generation) and of TVM's version."""
    import tvm

    from edgeq.compile import codegen, lower_integer

    digest = hashlib.sha256(tvm.__version__.encode())
    for module in (codegen, lower_integer):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def cache_path() -> Path:
    """Where this CPU's calibration is cached."""
    folder = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "edgeq")
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-") or "unknown"
    return folder / f"cpu-{slug}.json"


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
    current = (cpu_model(), host_arch(), _threads(), kernel_fingerprint())
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
        threads=_threads(),
        fingerprint=kernel_fingerprint(),
        figures=figures,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.perf_counter() - started, 1),
    )
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        Path(temporary).write_text(json.dumps(calibration.to_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("calibration cached in %s", path)
    return calibration


def _network() -> object:
    """The calibration network: one kernel of each kind the figures describe."""
    import torch
    from torch import nn

    from edgeq.quantization import DeQuantStub, QuantStub

    class Calibration(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = QuantStub()
            self.dense = nn.Conv2d(8, 32, 3, padding=1)
            self.pointwise = nn.Conv2d(32, 64, 1)
            self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
            self.pool = nn.MaxPool2d(2)
            self.dense2 = nn.Conv2d(64, 64, 3, padding=1)
            self.linear = nn.Linear(64, 256)
            self.dequant = DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.pointwise(torch.relu(self.dense(self.quant(x)))))
            x = self.dense2(self.pool(torch.relu(self.depthwise(x))))
            return self.dequant(self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))

    return Calibration().eval()


def _measure_figures(host: Target, folder: Path) -> CpuFigures:
    import torch

    from edgeq.compile import compile_model
    from edgeq.perf.measure import measure
    from edgeq.quantization import FakeQuantState, convert_fx, default_calib_qconfig, prepare_qat_fx, set_fake_quantize

    torch.manual_seed(0)
    example = torch.randn(1, 8, 32, 32)
    prepared = prepare_qat_fx(_network(), default_calib_qconfig, example_inputs=(example,), target=host.name)
    set_fake_quantize(prepared, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn_like(example))
    result = compile_model(convert_fx(prepared), (example,), target=host.name, out=folder / "calibration.edgeq", progress=lambda _: None)
    measured = measure(result.artifact, runs=5)
    graph = result.graph
    seconds = {name: call.seconds for name, call in measured.ops.items()}
    moved = {op.name: op.bytes_in + op.bytes_out + op.weight_bytes for op in graph.ops}
    overhead = statistics.median(seconds[op.name] for op in graph.ops if op.name in seconds and moved[op.name] < SMALL_KERNEL_BYTES)

    def rate(ops: list, work: dict[str, int]) -> float:
        total = sum(work[op.name] for op in ops)
        busy = sum(max(seconds[op.name] - overhead, seconds[op.name] / 2) for op in ops)
        return total / busy

    measured_ops = [op for op in graph.ops if op.name in seconds]
    convs = [op for op in measured_ops if op.op == "conv2d"]
    macs = {op.name: op.macs for op in graph.ops}
    return CpuFigures(
        conv2d_int8_macs_per_s=rate([op for op in convs if op.attributes["groups"] == 1], macs),
        depthwise_int8_macs_per_s=rate([op for op in convs if op.attributes["groups"] > 1], macs),
        linear_int8_macs_per_s=rate([op for op in measured_ops if op.op == "linear"], macs),
        float32_macs_per_s=host.perf.float32_macs_per_s,
        memory_bytes_per_s=rate([op for op in measured_ops if op.op in ("max_pool2d", "global_avg_pool2d")], moved),
        kernel_overhead_ns=overhead * 1e9,
    )
