"""How busy this machine's CPUs are, from ``/proc/stat`` (Linux), for the peer benchmark (issue 34).

Standard library only: the runners import it in each peer's own environment too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

IDLE_FIELDS = (3, 4)
"""Positions of ``idle`` and ``iowait`` among the ``cpu`` line's counters (user nice system idle iowait irq ...)."""


@dataclass(frozen=True)
class CpuTimes:
    """The machine's CPU counters at one moment: busy and total seconds summed over all CPUs."""

    busy_s: float
    total_s: float


def parse_proc_stat(text: str) -> CpuTimes:
    """The busy and total seconds of the first (``cpu``, all CPUs) line of a ``/proc/stat`` text."""
    line = next((row for row in text.splitlines() if row.startswith("cpu ")), None)
    if line is None:
        raise ValueError("/proc/stat: no 'cpu ' line (is this Linux?)")
    ticks = [int(value) for value in line.split()[1:9]]  # guest times are already counted in user and nice
    idle = sum(ticks[i] for i in IDLE_FIELDS)
    per_second = os.sysconf("SC_CLK_TCK")
    return CpuTimes((sum(ticks) - idle) / per_second, sum(ticks) / per_second)


def cpu_times() -> CpuTimes:
    """This machine's CPU counters now."""
    with open("/proc/stat") as stat:
        return parse_proc_stat(stat.read())


def busy_cores(before: CpuTimes, after: CpuTimes, wall_s: float, own_cpu_s: float = 0.0) -> float:
    """Cores kept busy between two readings ``wall_s`` apart, less ``own_cpu_s`` seconds of CPU the measured
    process used itself: the load of everything else."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive; got {wall_s}")
    return max(after.busy_s - before.busy_s - own_cpu_s, 0.0) / wall_s


def own_cpu_s() -> float:
    """CPU seconds this process has used so far, all its threads."""
    times = os.times()
    return times.user + times.system


def wait_until_idle(threshold_cores: float, window_s: float = 0.5, timeout_s: float = 60.0) -> tuple[bool, float]:
    """Wait until a ``window_s`` window finds the machine busier than nothing by less than ``threshold_cores``;
    give up after ``timeout_s``. Returns whether it became idle, and the last window's busy cores."""
    deadline = time.monotonic() + timeout_s
    while True:
        before, started = cpu_times(), time.monotonic()
        time.sleep(window_s)
        load = busy_cores(before, cpu_times(), time.monotonic() - started)
        if load <= threshold_cores or time.monotonic() >= deadline:
            return load <= threshold_cores, load
