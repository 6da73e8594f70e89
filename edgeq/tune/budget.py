"""Spending a tuning budget: which kernel to measure next, a line per measured batch, and the stop when time is up.

:class:`BudgetScheduler` is MetaSchedule's task scheduler here: it measures next the kernel that promises most,
``runs x best time / (1 + trials)`` (the model's time in the kernel, divided by the effort spent on it so far),
ends a kernel whose search proposes no new candidate (MetaSchedule would offer it again and again), and ends the
search once the deadline has passed; MetaSchedule then joins the batch in flight and keeps every record.
:class:`Progress` is the measure callback that follows each batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

from edgeq.tune.measure import mean_seconds
from edgeq.tune.tasks import Task


def milliseconds(seconds: float) -> str:
    """A kernel time as the tuner prints it (``0.137 ms``)."""
    return f"{seconds * 1e3:.3f} ms"


def clock(seconds: float) -> str:
    """A time left as ``m:ss`` (``0:00`` once spent)."""
    minutes, seconds = divmod(max(0, round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


@dataclass
class TuningState:
    """What the scheduler and the callback share.

    Attributes:
        tasks: the kernels tuned; defaults: their default schedules' times (seconds).
        deadline: end of the budget (``time.monotonic()``).
        report: where progress lines go.
        best: best mean time per task so far (seconds), starting with the default's.
        trials: measured candidates per task.
        exhausted: tasks whose search proposed no new candidate (their space is measured, as far as it finds).
    """

    tasks: list[Task]
    defaults: list[float]
    deadline: float
    report: Callable[[str], None]
    best: list[float] = field(init=False)
    trials: list[int] = field(init=False)
    exhausted: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.best = list(self.defaults)
        self.trials = [0] * len(self.tasks)

    def promise(self, index: int) -> float:
        """How much measuring task ``index`` next promises: the model's time in it per trial spent on it."""
        return self.tasks[index].count * self.best[index] / (1 + self.trials[index])

    def left(self) -> float:
        """Seconds left of the budget (negative when spent)."""
        return self.deadline - time.monotonic()


@derived_object
class BudgetScheduler(PyTaskScheduler):
    """MetaSchedule's task scheduler for a budget (see the module)."""

    def __init__(self, state: TuningState) -> None:
        super().__init__()
        self.state = state
        self.running: int | None = None

    def next_task_id(self) -> int:
        scheduler = self._outer()
        tasks = scheduler.tasks_
        if self.running is not None and not tasks[self.running].is_terminated:
            self.join_running_task(self.running)  # the batch sent last; MetaSchedule wants it joined first
        self.running = None
        for index in self.state.exhausted:
            if not tasks[index].is_terminated:
                scheduler.terminate_task(index)  # MetaSchedule ends a task only when its search returns nothing at all
        alive = [index for index, task in enumerate(tasks) if not task.is_terminated]
        if not alive:
            return -1
        if self.state.left() <= 0:
            self.state.report("budget spent: stopping (every record so far is kept)")
            return -1
        self.running = max(alive, key=self.state.promise)
        return self.running


@derived_object
class Progress(PyMeasureCallback):
    """MetaSchedule's measure callback: updates the state and reports each measured batch."""

    def __init__(self, state: TuningState) -> None:
        super().__init__()
        self.state = state

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        state = self.state
        if not runner_results:
            state.exhausted.add(task_id)
            return
        state.trials[task_id] += len(runner_results)
        times = [mean_seconds(result) for result in runner_results]
        state.best[task_id] = min([state.best[task_id], *(t for t in times if t is not None)])
        failed = times.count(None)
        task = state.tasks[task_id]
        state.report(
            f"kernel {task_id + 1}/{len(state.tasks)} {task.schedule} x{task.count}: {state.trials[task_id]} trials"
            + (f" ({failed} failed)" if failed else "")
            + f", best {milliseconds(state.best[task_id])} (default {milliseconds(state.defaults[task_id])}); "
            + f"{clock(state.left())} left"
        )
