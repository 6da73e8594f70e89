"""The decisions a blocked kernel's schedule makes, fixed (the default schedules) or sampled (the tuner's space).

A schedule asks a :class:`Choices` for each decision it has: how to split a loop into an outer loop and a
register-tile loop, and which of a few loop orders to use. :data:`DEFAULT` answers with the default schedule's
fixed values; :data:`SAMPLED` records MetaSchedule sampling instructions (``sample_perfect_tile``,
``sample_categorical``) in the schedule's trace, so that MetaSchedule's search explores every combination and its
database replays the best one. Every decision only moves loops: all of them give the same numbers.
"""

from __future__ import annotations

from typing import Protocol

from tvm import s_tir

LoopRV = s_tir.schedule.LoopRV


class Choices(Protocol):
    """Where a schedule's decisions come from."""

    def split(self, sch: s_tir.Schedule, loop: LoopRV, limit: int, default: int) -> list[LoopRV]:
        """``loop`` split into ``[outer, inner]``; ``inner`` divides the extent, at most ``limit``
        (``default`` when not sampled)."""
        ...

    def pick(self, sch: s_tir.Schedule, count: int, default: int) -> int:
        """One of ``count`` alternatives (``default`` when not sampled)."""
        ...


class _Default:
    def split(self, sch: s_tir.Schedule, loop: LoopRV, limit: int, default: int) -> list[LoopRV]:
        return list(sch.split(loop, [None, default]))

    def pick(self, sch: s_tir.Schedule, count: int, default: int) -> int:
        return default


class _Sampled:
    def split(self, sch: s_tir.Schedule, loop: LoopRV, limit: int, default: int) -> list[LoopRV]:
        return list(sch.split(loop, sch.sample_perfect_tile(loop, n=2, max_innermost_factor=limit)))

    def pick(self, sch: s_tir.Schedule, count: int, default: int) -> int:
        decision = sch.sample_categorical(list(range(count)), [1.0 / count] * count)
        return int(sch.get(decision))


DEFAULT: Choices = _Default()
"""The default schedules' decisions."""

SAMPLED: Choices = _Sampled()
"""Every decision sampled, for MetaSchedule's search."""
