"""Following a tuning run: a line per measured batch with the best time so far and the time left, and the stop
when the budget is spent."""

from __future__ import annotations

import time
from collections.abc import Callable

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

from edgeq.tune.measure import mean_seconds
from edgeq.tune.tasks import Task


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(max(0, round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


def milliseconds(seconds: float) -> str:
    """A kernel time as the tuner prints it (``0.137 ms``)."""
    return f"{seconds * 1e3:.3f} ms"


@derived_object
class Budget(PyMeasureCallback):
    """A MetaSchedule measure callback: reports each measured batch and ends every task once ``deadline``
    (``time.monotonic()``) has passed.

    Attributes:
        trials: measured candidates per task.
        best: best mean time per task, in seconds (starting with the default schedule's).
        stopped: the budget was spent before every task had measured its space.
    """

    def __init__(self, tasks: list[Task], defaults: list[float], deadline: float, report: Callable[[str], None]) -> None:
        super().__init__()
        self.tasks = tasks
        self.defaults = defaults
        self.best = list(defaults)
        self.trials = [0] * len(tasks)
        self.deadline = deadline
        self.report = report
        self.stopped = False

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.trials[task_id] += len(runner_results)
        for result in runner_results:
            seconds = mean_seconds(result)
            if seconds is not None and seconds < self.best[task_id]:
                self.best[task_id] = seconds
        task = self.tasks[task_id]
        left = self.deadline - time.monotonic()
        failed = sum(mean_seconds(r) is None for r in runner_results)
        self.report(
            f"kernel {task_id + 1}/{len(self.tasks)} {task.schedule} x{task.count}: {self.trials[task_id]} trials"
            + (f" ({failed} failed)" if failed else "")
            + f", best {milliseconds(self.best[task_id])} (default {milliseconds(self.defaults[task_id])}); {_clock(left)} left"
        )
        if left <= 0 and not self.stopped:
            self.stopped = True
            self.report("budget spent: stopping (the records so far are kept)")
            for index, record in enumerate(task_scheduler.tasks_):
                if not record.is_terminated:
                    task_scheduler.terminate_task(index)
