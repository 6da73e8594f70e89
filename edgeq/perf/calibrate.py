"""Measuring this machine's CPU figures on edgeq's own compiled kernels, cached per CPU model and target.

Two calibration networks (:func:`~.calibration_fit.calibration_networks`) are quantized, compiled for the target
like any model, and run in the same interleaved rounds; every kernel call is timed (:mod:`.measure`). The figures of
:class:`~edgeq.targets.CpuFigures` are fitted in two steps, each by non-negative least squares on the relative
error (:func:`~.calibration_fit.fit_nonnegative`):

1. The kernels of the large network that run on all cores give the rates: ``t = fixed + Σ work / rate`` over
   :data:`~.estimate.CPU_RATES` (each kernel's ops' :func:`~.estimate.cpu_work`: MACs by class, requantized
   outputs, packed inputs), and ``bytes read and written / memory_bytes_per_s`` for kernels that are not
   convolutions or linear layers (``blocked_memory_bytes_per_s`` where the layout plan gave them blocked tensors:
   the max pool between convolutions, vectorized over a block's channels). A rate that fits as zero (too fast to
   tell apart from the rest) takes the fastest any kernel doing that work ran at (:func:`~.calibration_fit._fastest`).
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

from edgeq.compile import kernels_dot_product
from edgeq.compile.compiled_graph import CompiledGraphError
from edgeq.fileio import atomic_write, cache_dir, slug
from edgeq.perf.calibration_fit import calibration_networks, compiled_network, fitted_figures
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
    generation), of the source that measures them (this module, :mod:`.calibration_fit` and :mod:`.measure`), of
    TVM's version and of ``host``'s ``[llvm]`` section (the CPU and features the kernels are built for)."""
    import tvm

    from edgeq import compile as compiler
    from edgeq.perf import calibration_fit, measure

    digest = hashlib.sha256(tvm.__version__.encode())
    digest.update(host.llvm.model_dump_json().encode())
    for source in [*sorted(Path(compiler.__file__).parent.rglob("*.py")), Path(__file__), Path(calibration_fit.__file__), Path(measure.__file__)]:
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


def calibration_run(host: Target, folder: Path, artifacts: Sequence[str | Path]) -> CalibrationRun:
    """Compile the calibration networks for ``host`` into ``folder``, measure them with ``artifacts`` in
    :data:`ROUNDS` interleaved rounds, then the probe and the VM's invocation, and fit the figures."""
    large, small = (compiled_network(network, example, host, folder / f"{name}.edgeq")
                    for name, (network, example) in zip(("large", "small"), calibration_networks()))
    before = cpu_times()
    large_measured, small_measured, *measurements = measure_together([large.artifact, small.artifact, *artifacts], runs=ROUNDS)
    probe_s = probe_latency(large.artifact)
    invocation = vm_invocation()
    share = others_share(before, cpu_times())
    figures = fitted_figures(host, (large.graph, large_measured), (small.graph, small_measured), invocation)
    rounds = {"large": large_measured.rounds_s, "small": small_measured.rounds_s}
    return CalibrationRun(figures, rounds, share, large.artifact, probe_s, measurements)
