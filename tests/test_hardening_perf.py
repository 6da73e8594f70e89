"""Issue 29, perf calibration: figures measured on a busy machine are not cached, a cached calibration is re-checked
with a probe, and the cache is keyed by the target's kernels. Every timing here is synthetic: the measurement
(``calibration_run``) and the probe (``probe``) are replaced, so no test depends on this machine's speed."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from pathlib import Path

import pytest
import torch
from models import SmallCNN, integer_model

from edgeq.compile import compile_model
from edgeq.compile.cpu_features import AVX2, VNNI
from edgeq.perf.calibrate import (
    PROBE_TOLERANCE,
    Calibration,
    CalibrationRun,
    Timing,
    apart,
    cache_path,
    cached_calibration,
    calibrate_alongside,
    calibration_key,
    holds,
    host_arch,
    host_figures,
    kernel_fingerprint,
    later_over_earlier,
    probe,
    probe_path,
    save_calibration,
)
from edgeq.perf.measure import CpuTimes, measure, others_share
from edgeq.targets import TargetKind, list_targets

calibration_module = importlib.import_module("edgeq.perf.calibrate")  # the module (edgeq.perf.calibrate is also a function)

STEADY_ROUNDS = [1.0e-3, 1.02e-3, 0.99e-3, 1.01e-3, 1.0e-3, 0.98e-3]
REFERENCE_S = 1.0e-3  # the probe's time at calibration


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def host():
    return next(t for t in list_targets() if t.kind is TargetKind.CPU and t.llvm.arch == host_arch())


@pytest.fixture
def probe_artifact(tmp_path) -> Path:
    """A stand-in for the large calibration network's artifact (only copied into the cache here)."""
    path = tmp_path / "large.edgeq"
    path.write_bytes(b"the probe")
    return path


def _figures(host, conv_rate: float):
    """``host``'s nominal figures with a conv2d rate that tells calibrations apart."""
    return host.perf.model_copy(update={"conv2d_int8_macs_per_s": conv_rate})


def _run(host, probe_artifact, others: float = 0.02, large=STEADY_ROUNDS, conv_rate: float = 1.0e11) -> CalibrationRun:
    return CalibrationRun(_figures(host, conv_rate), {"large": list(large), "small": STEADY_ROUNDS}, others, probe_artifact, REFERENCE_S, [])


def _measuring(monkeypatch, runs: list[CalibrationRun]) -> list[CalibrationRun]:
    """Make calibrations return ``runs`` in turn; the list shrinks as they are used."""
    monkeypatch.setattr(calibration_module, "calibration_run", lambda *_: runs.pop(0))
    return runs


def _cached(host, probe_artifact, conv_rate: float = 5.0e10) -> Calibration:
    calibration = Calibration(
        **calibration_key(host), figures=_figures(host, conv_rate), probe_s=REFERENCE_S, measured_at="2026-01-01T00:00:00Z", seconds=12.0
    )
    save_calibration(calibration, probe_artifact)
    return calibration


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == calibration_module.__name__]


# -- how busy the machine is, and how far apart the rounds ran --------------------------------------------------


@pytest.mark.parametrize(
    ("after", "share"),
    [
        (CpuTimes(102.0, 31.0, 21.0), 0.0),  # every busy second was this process's
        (CpuTimes(102.0, 32.0, 21.0), 0.5),  # one of two core-seconds went to others
        (CpuTimes(102.0, 30.5, 21.0), 0.0),  # this process counted more than all (tick rounding): not negative
        (CpuTimes(100.0, 30.0, 20.0), 0.0),  # no time passed
    ],
)
def test_others_share_of_the_cpus(after, share):
    assert others_share(CpuTimes(100.0, 30.0, 20.0), after) == share


def test_later_rounds_over_earlier_ones():
    assert later_over_earlier([1.0, 1.0, 2.0, 2.0]) == 2.0
    assert later_over_earlier([2.0, 2.0, 2.0, 1.0, 1.0]) == 0.5  # the middle round of an odd count is a later one
    assert apart(0.5) == apart(2.0) == 1.0


@pytest.mark.parametrize(
    ("others", "large", "reason"),
    [
        (0.02, STEADY_ROUNDS, ""),
        (0.4, STEADY_ROUNDS, "other processes used 40% of the CPUs"),
        (0.02, [1e-3, 1e-3, 1e-3, 1.5e-3, 1.5e-3, 1.5e-3], "the large network's later rounds took 1.50x the time of its earlier ones"),
        (0.02, [2e-3, 2e-3, 2e-3, 1e-3, 1e-3, 1e-3], "the large network's later rounds took 0.50x the time of its earlier ones"),
        (
            0.5,
            [1e-3, 1e-3, 1e-3, 2e-3, 2e-3, 2e-3],
            "other processes used 50% of the CPUs and the large network's later rounds took 2.00x the time of its earlier ones",
        ),
    ],
)
def test_why_a_calibration_is_unsteady(host, probe_artifact, others, large, reason):
    assert _run(host, probe_artifact, others, large).unsteady() == reason


def test_the_real_instruments_record_rounds_probe_and_share(host, tmp_path):
    """The bookkeeping of the real measurement and probe (not their speed): a latency per round, around the
    median of all runs, a probe time and a share."""
    torch.manual_seed(0)
    example = torch.rand(1, 1, 8, 8)
    artifact = compile_model(integer_model(SmallCNN().eval(), example, host.name), (example,), target=host.name, out=tmp_path / "s.edgeq").artifact
    measured = measure(artifact, runs=3)
    assert len(measured.rounds_s) == 3 and min(measured.rounds_s) <= measured.latency_s <= max(measured.rounds_s)
    timing = probe(artifact)
    assert timing.seconds > 0 and 0 <= timing.others_share <= 1


# -- a calibration on a busy machine is used, not cached --------------------------------------------------------


@pytest.mark.parametrize(
    ("others", "large"),
    [(0.6, STEADY_ROUNDS), (0.02, [1e-3, 1e-3, 1e-3, 2e-3, 2e-3, 2e-3])],
    ids=["busy", "rounds-disagree"],
)
def test_figures_of_a_busy_machine_are_used_but_not_cached(host, probe_artifact, monkeypatch, caplog, others, large):
    _measuring(monkeypatch, [_run(host, probe_artifact, others, large)])
    calibration, measurements = calibrate_alongside(host, [])
    assert calibration.figures.conv2d_int8_macs_per_s == 1.0e11 and measurements == []
    assert not cache_path(host.name).exists() and not probe_path(host.name).exists()
    (warning,) = _warnings(caplog)
    assert warning.startswith("CPU figures measured while ") and warning.endswith(": used for this estimate, not cached")


def test_figures_of_a_quiet_machine_are_cached_with_their_probe(host, probe_artifact, monkeypatch, caplog):
    _measuring(monkeypatch, [_run(host, probe_artifact)])
    calibration, _ = calibrate_alongside(host, [])
    assert cached_calibration(host) == calibration and calibration.probe_s == REFERENCE_S
    assert probe_path(host.name).read_bytes() == b"the probe" and _warnings(caplog) == []
    assert calibration.source == (
        f"measured on {calibration.cpu} ({host.name}: {calibration.dot_product} kernels, {calibration.threads} threads, {calibration.measured_at})"
    )


def test_a_busy_machine_recalibrates_every_time_until_a_quiet_one_is_cached(host, probe_artifact, monkeypatch):
    runs = _measuring(monkeypatch, [_run(host, probe_artifact, others=0.6, conv_rate=3e10), _run(host, probe_artifact, conv_rate=1e11)])
    assert host_figures(host)[0].conv2d_int8_macs_per_s == 3e10  # used, not cached
    assert host_figures(host)[0].conv2d_int8_macs_per_s == 1e11  # measured again, quiet: cached
    assert runs == [] and cached_calibration(host).figures.conv2d_int8_macs_per_s == 1e11


# -- the probe re-checks a cached calibration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probe_s", "others", "kept", "warning"),
    [
        (REFERENCE_S * (1 + PROBE_TOLERANCE), 0.0, True, None),
        (REFERENCE_S / (1 + PROBE_TOLERANCE), 0.9, True, None),  # within the tolerance, busy or not
        (REFERENCE_S * 1.5, 0.0, False, "the cached CPU figures of {target} are off (a probe ran 1.50 ms, 1.00 ms when they were measured"),
        (REFERENCE_S * 0.5, 0.0, False, "the cached CPU figures of {target} are off (a probe ran 0.50 ms, 1.00 ms when they were measured"),
        (REFERENCE_S * 0.5, 0.6, True, "the cached CPU figures of {target} are slower than this machine runs now"),
        (REFERENCE_S * 2.0, 0.6, True, "this machine runs slower than when its CPU figures for {target} were measured"),
    ],
)
def test_the_probe_keeps_or_rejects_a_cached_calibration(host, probe_artifact, caplog, probe_s, others, kept, warning):
    calibration = _cached(host, probe_artifact)
    assert holds(calibration, Timing(probe_s, others)) is kept
    warnings = _warnings(caplog)
    if warning is None:
        assert warnings == []
    else:
        (line,) = warnings
        assert line.startswith(warning.format(target=host.name))
    if others > 0.5 and warning:
        assert "other processes use 60% of the CPUs" in line
        assert ("the estimate may be pessimistic" in line) is (probe_s < REFERENCE_S)


def test_a_probe_on_time_keeps_the_cache(host, probe_artifact, monkeypatch):
    _cached(host, probe_artifact)
    monkeypatch.setattr(calibration_module, "probe", lambda artifact: Timing(REFERENCE_S * 1.1, 0.0))
    _measuring(monkeypatch, [])  # a calibration would fail: pop from an empty list
    figures, source = host_figures(host)
    assert figures.conv2d_int8_macs_per_s == 5.0e10 and source.startswith("measured on ")


def test_a_probe_off_on_a_quiet_machine_recalibrates(host, probe_artifact, monkeypatch, caplog):
    _cached(host, probe_artifact)
    probed: list[Path] = []
    monkeypatch.setattr(calibration_module, "probe", lambda artifact: probed.append(artifact) or Timing(REFERENCE_S * 2, 0.0))
    runs = _measuring(monkeypatch, [_run(host, probe_artifact, conv_rate=1e11)])
    assert host_figures(host)[0].conv2d_int8_macs_per_s == 1e11
    assert probed == [probe_path(host.name)] and runs == []
    assert cached_calibration(host).figures.conv2d_int8_macs_per_s == 1e11  # the new figures replace the cache
    assert any("are off" in line for line in _warnings(caplog))


def test_a_probe_off_on_a_busy_machine_keeps_the_cache_and_says_so(host, probe_artifact, monkeypatch, caplog):
    _cached(host, probe_artifact)
    monkeypatch.setattr(calibration_module, "probe", lambda artifact: Timing(REFERENCE_S * 2, 0.7))
    _measuring(monkeypatch, [])
    assert host_figures(host)[0].conv2d_int8_macs_per_s == 5.0e10
    (line,) = _warnings(caplog)
    assert "other processes use 70% of the CPUs" in line


def test_recalibrate_measures_without_probing(host, probe_artifact, monkeypatch):
    _cached(host, probe_artifact)
    monkeypatch.setattr(calibration_module, "probe", lambda artifact: pytest.fail("probed"))
    _measuring(monkeypatch, [_run(host, probe_artifact, conv_rate=2e11)])
    assert host_figures(host, recalibrate=True)[0].conv2d_int8_macs_per_s == 2e11


def test_a_damaged_probe_recalibrates(host, probe_artifact, monkeypatch, caplog):
    """The real probe reads the cached artifact: a damaged one is one line, then a new calibration."""
    _cached(host, probe_artifact)  # the stand-in is no artifact
    runs = _measuring(monkeypatch, [_run(host, probe_artifact, conv_rate=1e11)])
    assert host_figures(host)[0].conv2d_int8_macs_per_s == 1e11 and runs == []
    (line, *_) = _warnings(caplog)
    assert line.startswith(f"{probe_path(host.name)}: ") and line.endswith("; measuring the CPU figures again")


# -- what a cached calibration must match ------------------------------------------------------------------------


def test_the_cache_is_per_target(host, probe_artifact):
    """The portable target and this machine's own are calibrated apart: two files, neither read for the other."""
    native = host.model_copy(update={"name": f"{host.name}-native"})
    _cached(host, probe_artifact)
    assert cache_path(native.name) != cache_path(host.name) and cached_calibration(native) is None


def test_figures_of_another_dot_product_are_stale(host, probe_artifact, monkeypatch, caplog):
    """Figures measured with VNNI kernels do not price an AVX2 build of the same CPU."""
    caplog.set_level(logging.INFO, logger=calibration_module.__name__)
    monkeypatch.setattr(calibration_module, "kernels_dot_product", lambda target: VNNI)
    _cached(host, probe_artifact)
    assert cached_calibration(host) is not None
    monkeypatch.setattr(calibration_module, "kernels_dot_product", lambda target: AVX2)
    assert cached_calibration(host) is None
    assert f"{cache_path(host.name)}: measured with dot_product vnni (now avx2-pmaddwd); measuring again" in caplog.messages


def test_another_llvm_section_changes_the_fingerprint(host):
    """A target whose [llvm] section changes (another CPU, other features) builds other kernels."""
    other = host.model_copy(update={"llvm": host.llvm.model_copy(update={"mattr": (*host.llvm.mattr, "-avx2")})})
    assert kernel_fingerprint(other) != kernel_fingerprint(host)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda data: data.pop("probe_s"), "missing 1 required positional argument: 'probe_s'"),
        (lambda data: data.update(probe_s=0), "probe_s must be positive; got 0"),
        (lambda data: data["figures"].pop("conv2d_int8_macs_per_s"), "figures.conv2d_int8_macs_per_s: Field required"),
        (lambda data: data.pop("figures"), "no 'figures'"),
    ],
    ids=["no-probe", "zero-probe", "figure-missing", "no-figures"],
)
def test_an_unreadable_cache_is_measured_again(host, probe_artifact, caplog, change, problem):
    _cached(host, probe_artifact)
    path = cache_path(host.name)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    assert cached_calibration(host) is None
    (line,) = _warnings(caplog)
    assert line.startswith(f"{path}: unreadable calibration cache (") and problem in line and line.endswith("); measuring again")
    assert "\n" not in line


def test_a_cache_without_its_probe_is_measured_again(host, probe_artifact, caplog):
    _cached(host, probe_artifact)
    probe_path(host.name).unlink()
    assert cached_calibration(host) is None
    assert _warnings(caplog) == [f"{cache_path(host.name)}: the calibration's probe {probe_path(host.name)} is missing; measuring again"]


def test_saving_writes_the_probe_before_the_calibration(host, probe_artifact, tmp_path):
    """A calibration file always has its probe: when the probe cannot be written, neither is the calibration."""
    calibration = dataclasses.replace(_cached(host, probe_artifact), target="elsewhere")
    with pytest.raises(FileNotFoundError):
        save_calibration(calibration, tmp_path / "missing.edgeq")
    assert not cache_path("elsewhere").exists() and not probe_path("elsewhere").exists()
