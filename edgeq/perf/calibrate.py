"""Measuring this machine's CPU figures on edgeq's own compiled kernels, cached per CPU model and target.

Two calibration networks (:func:`_networks`) are quantized, compiled for the target like any model, and run in
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

Float figures are not measured (``float32_macs_per_s`` stays the target's). Figures measured on a busy machine
would price every later estimate at the busy speed, so they are cached only when the machine was quiet
(:meth:`CalibrationRun.unsteady`: other processes used at most :data:`BUSY_SHARE` of the CPUs, and the earlier
and later halves of the rounds ran within :data:`ROUNDS_TOLERANCE` of each other); otherwise they serve the
estimate at hand only. The cache is JSON in ``$EDGEQ_CACHE_DIR`` (default ``~/.cache/edgeq``),
``cpu-<model>-<target>.json``, keyed by :func:`calibration_key` (the CPU, the target and its kernels' dot product,
the threads, and a fingerprint of the kernel generator and of the target's ``[llvm]`` section), beside the large
network's artifact (``.edgeq``), the probe: a cached calibration holds while the probe runs within
:data:`PROBE_TOLERANCE` of its time at calibration (:func:`holds`). Nothing here is hard-coded about a CPU: it
measures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from edgeq.compile import CompileResult, kernels_dot_product
from edgeq.compile.compiled_graph import CompiledGraph, CompiledGraphError, Op
from edgeq.compile.cpu_features import DOT_PRODUCTS
from edgeq.fileio import atomic_write, cache_dir, slug
from edgeq.perf.estimate import CPU_RATES, MAC_OPS, cpu_work, memory_priced, moves_blocked_tensors
from edgeq.perf.measure import (
    Measurement,
    cpu_times,
    measure_together,
    measurement_threads,
    others_share,
    probe_latency,
    vm_invocation,
)
from edgeq.targets import CpuFigures, Target

logger = logging.getLogger(__name__)

ROUNDS = 15
"""Interleaved rounds of a calibration (:func:`~.measure.measure_together`)."""

ROUNDS_TOLERANCE = 0.15
"""How far apart the earlier and the later half of a calibration's rounds may run (the ratio of their median
latencies, less 1) for its figures to be cached: more, and the machine's speed changed while it was measured."""

BUSY_SHARE = 0.15
"""The largest share of the CPUs other processes may use while a calibration or a probe runs for the machine to
count as quiet (:func:`~.measure.others_share`)."""

PROBE_TOLERANCE = 0.25
"""How far the probe may run from its time at calibration (the ratio, less 1, either way) for the cached figures to
hold (repeated probes here spread by under 10 %; figures calibrated on a busy machine were half the quiet ones)."""


@dataclass(frozen=True)
class Calibration:
    """This machine's measured CPU figures, and what they were measured with.

    Attributes:
        cpu: the CPU model (``AMD EPYC 7B13``), as the OS names it.
        arch: ``x86_64`` or ``aarch64``.
        target: the CPU target whose kernels were measured (``x86_64``).
        dot_product: the int8 dot product of those kernels (``vnni``, ``avx2-pmaddwd``).
        threads: the kernels' thread count.
        fingerprint: of the kernel generator's source and the target's ``[llvm]`` section; figures of other
            kernels are stale.
        figures: the measured figures (``float32_macs_per_s`` is the target's nominal one).
        probe_s: the probe's time right after the measurement (:func:`~.measure.probe_latency`, seconds).
        measured_at: UTC time of the measurement.
        seconds: how long calibration took.

    Raises:
        ValueError: ``probe_s`` is not positive.
    """

    cpu: str
    arch: str
    target: str
    dot_product: str
    threads: int
    fingerprint: str
    figures: CpuFigures
    probe_s: float
    measured_at: str
    seconds: float

    def __post_init__(self) -> None:
        if not self.probe_s > 0:
            raise ValueError(f"probe_s must be positive; got {self.probe_s}")

    @property
    def source(self) -> str:
        """Where the figures come from, as the report says it (``figures.cpu_source``)."""
        return f"measured on {self.cpu} ({self.target}: {self.dot_product} kernels, {self.threads} threads, {self.measured_at})"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "figures": self.figures.model_dump()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Calibration:
        return cls(**{**data, "figures": CpuFigures.model_validate(data["figures"])})


@dataclass(frozen=True)
class Timing:
    """A timed piece of work: its ``seconds``, and the share of the CPUs other processes used meanwhile."""

    seconds: float
    others_share: float


def busy(others: float) -> bool:
    """Whether other processes used more than :data:`BUSY_SHARE` of the CPUs (``others``, 0 to 1)."""
    return others > BUSY_SHARE


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


def kernel_fingerprint(host: Target) -> str:
    """A hash of the source that generates edgeq's kernels (lowering, pipeline, kernels, schedules, code
    generation), of the source that measures them (this module and :mod:`.measure`), of TVM's version and of
    ``host``'s ``[llvm]`` section (the CPU and features the kernels are built for)."""
    import tvm

    from edgeq import compile as compiler
    from edgeq.perf import measure

    digest = hashlib.sha256(tvm.__version__.encode())
    digest.update(host.llvm.model_dump_json().encode())
    for source in [*sorted(Path(compiler.__file__).parent.rglob("*.py")), Path(__file__), Path(measure.__file__)]:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def calibration_key(host: Target) -> dict[str, object]:
    """What figures measured now for ``host`` would be measured with, the fields of :class:`Calibration` a cached
    one must match: this CPU, the target and its kernels' dot product (figures of VNNI kernels are wrong for an
    AVX2 build of the same CPU), the thread count and :func:`kernel_fingerprint`."""
    return {
        "cpu": cpu_model(),
        "arch": host_arch(),
        "target": host.name,
        "dot_product": kernels_dot_product(host).name,
        "threads": measurement_threads(),
        "fingerprint": kernel_fingerprint(host),
    }


def cache_path(target: str) -> Path:
    """Where this CPU's calibration for the CPU target named ``target`` is cached."""
    return cache_dir() / f"cpu-{slug(cpu_model())}-{slug(target)}.json"


def probe_path(target: str) -> Path:
    """The probe of the cached calibration (:func:`cache_path`): the large calibration network's artifact."""
    return cache_path(target).with_suffix(".edgeq")


def cached_calibration(host: Target) -> Calibration | None:
    """The cached calibration of this CPU for ``host``, if it matches :func:`calibration_key` and has its probe."""
    path = cache_path(host.name)
    try:
        calibration = Calibration.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as error:
        logger.warning("%s: unreadable calibration cache (%s); measuring again", path, _problem(error))
        return None
    stale = [f"{key} {getattr(calibration, key)} (now {value})" for key, value in calibration_key(host).items() if getattr(calibration, key) != value]
    if stale:
        logger.info("%s: measured with %s; measuring again", path, ", ".join(stale))
        return None
    if not probe_path(host.name).is_file():
        logger.warning("%s: the calibration's probe %s is missing; measuring again", path, probe_path(host.name))
        return None
    return calibration


def _problem(error: ValueError | TypeError | KeyError) -> str:
    """What is wrong with a cache file, in one line."""
    if isinstance(error, ValidationError):
        return "; ".join(f"figures.{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors())
    if isinstance(error, KeyError):
        return f"no {error}"
    return str(error)


def host_figures(host: Target, recalibrate: bool = False) -> tuple[CpuFigures, str]:
    """The figures that cost ``host``'s layers, and where they come from.

    On a machine of the host's architecture they are measured: cached (:func:`cached_calibration`) while a probe
    confirms them (:func:`holds`), else measured again, as with ``recalibrate``. Elsewhere they are the target's
    nominal ``[perf]`` figures.

    Returns:
        (figures, :attr:`Calibration.source` or ``"nominal (<target file>)"``).
    """
    if host.llvm.arch != host_arch():
        return host.perf, f"nominal ([perf] of {host.name}: this machine is {host_arch()})"
    calibration = None if recalibrate else cached_calibration(host)
    if calibration is not None and not _probe_holds(calibration):
        calibration = None
    if calibration is None:
        calibration = calibrate(host)
    return calibration.figures, calibration.source


def probe(artifact: Path) -> Timing:
    """The probe's time now (:func:`~.measure.probe_latency` of ``artifact``) and how busy the machine was.

    Raises:
        CompiledGraphError: the artifact cannot be read.
    """
    before = cpu_times()
    seconds = probe_latency(artifact)
    return Timing(seconds, others_share(before, cpu_times()))


def _probe_holds(calibration: Calibration) -> bool:
    """Whether ``calibration`` holds by its probe run now (:func:`holds`); not when the probe is unreadable."""
    try:
        timing = probe(probe_path(calibration.target))
    except CompiledGraphError as error:
        logger.warning("%s; measuring the CPU figures again", error)
        return False
    return holds(calibration, timing)


def apart(ratio: float) -> float:
    """How far apart two times of ``ratio`` are, either way round (1.5 and 1 / 1.5: 0.5)."""
    return max(ratio, 1 / ratio) - 1


def holds(calibration: Calibration, probe_now: Timing) -> bool:
    """Whether ``calibration`` still prices this machine by the probe run now: when the probe runs within
    :data:`PROBE_TOLERANCE` of its time at calibration, or when the machine is busy now (measuring it would give
    the busy speed; it says so in one line). Otherwise it says why it measures again."""
    change = probe_now.seconds / calibration.probe_s
    if apart(change) <= PROBE_TOLERANCE:
        return True
    times = f"a probe ran {probe_now.seconds * 1e3:.2f} ms, {calibration.probe_s * 1e3:.2f} ms when they were measured at {calibration.measured_at}"
    if not busy(probe_now.others_share):
        logger.warning("the cached CPU figures of %s are off (%s); measuring them again", calibration.target, times)
        return False
    if change < 1:
        logger.warning(
            "the cached CPU figures of %s are slower than this machine runs now (%s) and other processes use %.0f%% of the CPUs: "
            "the estimate may be pessimistic; recalibrate (edgeq perf --recalibrate) when the machine is quiet",
            calibration.target, times, probe_now.others_share * 100,
        )
    else:
        logger.warning(
            "this machine runs slower than when its CPU figures for %s were measured (%s): other processes use %.0f%% of the CPUs; "
            "the estimate is for the machine when quiet",
            calibration.target, times, probe_now.others_share * 100,
        )
    return True


@dataclass(frozen=True)
class CalibrationRun:
    """What a calibration measured.

    Attributes:
        figures: the fitted figures.
        rounds: each calibration network's latency in each round (:attr:`~.measure.Measurement.rounds_s`), by name.
        others_share: the share of the CPUs other processes used during the rounds and the probe.
        probe: the probe's artifact (the large network's).
        probe_s: the probe's time right after the rounds.
        measurements: of the artifacts measured alongside.
    """

    figures: CpuFigures
    rounds: dict[str, list[float]]
    others_share: float
    probe: Path
    probe_s: float
    measurements: list[Measurement]

    def unsteady(self) -> str:
        """Why the figures may not hold for a later estimate ("" when they will): other processes used more than
        :data:`BUSY_SHARE` of the CPUs, or a network's later rounds ran more than :data:`ROUNDS_TOLERANCE` from its
        earlier ones."""
        reasons = [f"other processes used {self.others_share:.0%} of the CPUs"] if busy(self.others_share) else []
        for name, rounds in self.rounds.items():
            change = later_over_earlier(rounds)
            if apart(change) > ROUNDS_TOLERANCE:
                reasons.append(f"the {name} network's later rounds took {change:.2f}x the time of its earlier ones")
        return " and ".join(reasons)


def later_over_earlier(rounds: Sequence[float]) -> float:
    """The median of the later half of ``rounds`` over that of the earlier half (the later one has the middle
    round of an odd count)."""
    half = len(rounds) // 2
    return statistics.median(rounds[half:]) / statistics.median(rounds[:half])


def calibrate(host: Target) -> Calibration:
    """Measure this machine's figures (about 15 s) and cache them if the machine was quiet (see the module
    docstring)."""
    return calibrate_alongside(host, [])[0]


def calibrate_alongside(host: Target, artifacts: Sequence[str | Path]) -> tuple[Calibration, list[Measurement]]:
    """:func:`calibrate`, measuring ``artifacts`` in the same rounds as the calibration networks
    (:func:`~.measure.measure_together`): on a machine whose speed drifts, the figures then hold for the
    speed the artifacts ran at (how the estimator's error is measured, benchmarks/perf_estimator_error.py).

    Returns:
        The calibration (cached when the machine was quiet, :meth:`CalibrationRun.unsteady`), and the measurement
        of each artifact.
    """
    started = time.perf_counter()
    logger.info("calibrating the performance estimator on this CPU (%s)", cpu_model())
    with tempfile.TemporaryDirectory(prefix="edgeq-calibrate-") as folder:
        run = calibration_run(host, Path(folder), artifacts)
        calibration = Calibration(
            **calibration_key(host),
            figures=run.figures,
            probe_s=run.probe_s,
            measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            seconds=round(time.perf_counter() - started, 1),
        )
        unsteady = run.unsteady()
        if unsteady:
            logger.warning("CPU figures measured while %s: used for this estimate, not cached", unsteady)
        else:
            save_calibration(calibration, run.probe)
    return calibration, run.measurements


def save_calibration(calibration: Calibration, probe_artifact: Path) -> Path:
    """Cache ``calibration`` (:func:`cache_path`) and its probe (:func:`probe_path`), the probe first."""
    path = cache_path(calibration.target)
    with atomic_write(probe_path(calibration.target)) as temporary:
        shutil.copyfile(probe_artifact, temporary)
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


def calibration_run(host: Target, folder: Path, artifacts: Sequence[str | Path]) -> CalibrationRun:
    """Compile the calibration networks for ``host`` into ``folder``, measure them with ``artifacts`` in
    :data:`ROUNDS` interleaved rounds, then the probe and the VM's invocation, and fit the figures."""
    large, small = (_compiled(network, example, host, folder / f"{name}.edgeq") for name, (network, example) in zip(("large", "small"), _networks()))
    before = cpu_times()
    large_measured, small_measured, *measurements = measure_together([large.artifact, small.artifact, *artifacts], runs=ROUNDS)
    probe_s = probe_latency(large.artifact)
    invocation = vm_invocation()
    share = others_share(before, cpu_times())
    figures = _fitted_figures(host, (large.graph, large_measured), (small.graph, small_measured), invocation)
    rounds = {"large": large_measured.rounds_s, "small": small_measured.rounds_s}
    return CalibrationRun(figures, rounds, share, large.artifact, probe_s, measurements)


def _fitted_figures(
    host: Target, large: tuple[CompiledGraph, Measurement], small: tuple[CompiledGraph, Measurement], invocation: float
) -> CpuFigures:
    """The figures fitted on the calibration networks' kernels (graph and measurement of each), with the VM's
    ``invocation`` cost (seconds); ``host``'s nominal figures where a work is not measured."""
    (large_graph, large_measured), (small_graph, small_measured) = large, small
    on_all_cores = [k for k in _timed_kernels(large_graph, large_measured) if k[0][0].parallel]
    on_one_core = [k for k in _timed_kernels(small_graph, small_measured) if not k[0][0].parallel]

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
