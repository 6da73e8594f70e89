"""This CPU's features, as Linux names them in ``/proc/cpuinfo``: what an artifact's ``library.cpu_features`` is
checked against when it is loaded (docs/artifact.md, "CPU features").

Where ``/proc/cpuinfo`` cannot be read or lists no features (not Linux, a sandbox hiding it), nothing is refused:
the check is a courtesy that names what is missing before a SIGILL would, not a guarantee.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
_FEATURE_KEYS = ("flags", "Features")
"""The line listing a processor's features: ``flags`` on x86_64, ``Features`` on aarch64."""


def cpu_features() -> frozenset[str] | None:
    """The features of the first processor ``/proc/cpuinfo`` lists, or None when it cannot be read or has none."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _FEATURE_KEYS:
            return frozenset(value.split())
    return None


def missing_features(required: Iterable[str]) -> list[str]:
    """Those of ``required`` this CPU lacks, in their order; none when this CPU's features cannot be read."""
    present = cpu_features()
    return [] if present is None else [name for name in required if name not in present]
