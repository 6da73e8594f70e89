"""tune_model: search better schedules for a model's kernels with MetaSchedule and keep them as tuning records.

The steps: plan the build as compile does (:func:`edgeq.compile.plan_build`), take the fused kernels the ``-O2``
pipeline makes, and tune the distinct blocked int8 kernels (:mod:`.tasks`). Each kernel's search space is its
default schedule with every decision sampled (register tile of channel blocks x columns, the order of the tile
loops; the CPU's int8 dot-product tensorization stays in every point), so every candidate computes the same
numbers. The default schedule is measured first and recorded, so the best record is never slower than it as
measured. The budget goes where the model's time is (:mod:`.budget`); MetaSchedule's evolutionary search and
XGBoost cost model choose the candidates; they are built here and timed on this machine
or on boards behind a TVM RPC tracker (:mod:`.measure`). The records go to the target's and CPU's folder
(:func:`edgeq.compile.tuning_records.records_folder`), which ``edgeq compile`` reads by itself; tuning again adds
to them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderInput

from edgeq.compile import plan_build
from edgeq.compile.codegen import fused_module
from edgeq.compile.cpu_features import DotProduct, dot_product
from edgeq.compile.tuning_records import open_database, records_folder
from edgeq.errors import TuneError
from edgeq.export.sources import ModelLike
from edgeq.targets import Target, TargetLike
from edgeq.tune.budget import BudgetScheduler, Progress, TuningState, clock, milliseconds
from edgeq.tune.measure import InProcessBuilder, Tracker, local_runner, mean_seconds
from edgeq.tune.tasks import LOGS, Task, task_log, tuning_tasks

__all__ = ["TuneError", "TuneResult", "TunedKernel", "Tracker", "tune_model"]

logger = logging.getLogger(__name__)

METASCHEDULE_LOGGER = "tvm.s_tir.meta_schedule"

TRIALS_PER_ITERATION = 8
"""Candidates measured per batch (a progress line each)."""

MAX_TRIALS_PER_KERNEL = 64
"""More than any kernel's search space holds; a kernel's search ends earlier when it has measured its space."""


@dataclass(frozen=True)
class TunedKernel:
    """One tuned kernel: how often the model runs it, and its default and best measured times (seconds)."""

    name: str
    schedule: str
    count: int
    trials: int
    default_seconds: float
    best_seconds: float


@dataclass
class TuneResult:
    """What ``tune_model`` measured and where it kept it.

    Attributes:
        records: the folder of tuning records (``edgeq compile`` reads it by itself when it is the default one).
        target: the target tuned for; machine: the LLVM target the kernels were built for.
        measured_on: ``this machine`` or the tracker's ``host:port key``.
        kernels: the distinct tunable kernels.
        seconds: how long tuning took.
    """

    records: Path
    target: Target
    machine: dict
    measured_on: str
    kernels: list[TunedKernel]
    seconds: float

    def summary_lines(self) -> list[str]:
        """A line per kernel, and the model's total over its tunable kernels, for the end of ``edgeq tune``."""
        lines = [f"{'kernel':<16} {'runs':>4} {'trials':>6} {'default':>10} {'tuned':>10} speed-up"]
        for kernel in self.kernels:
            lines.append(
                f"{kernel.schedule:<16} {kernel.count:>4} {kernel.trials:>6} {milliseconds(kernel.default_seconds):>10} "
                f"{milliseconds(kernel.best_seconds):>10} {kernel.default_seconds / kernel.best_seconds:.2f}x"
            )
        default = sum(k.default_seconds * k.count for k in self.kernels)
        best = sum(k.best_seconds * k.count for k in self.kernels)
        lines.append(f"tunable kernels per run: default {milliseconds(default)}, tuned {milliseconds(best)} ({default / best:.2f}x faster)")
        lines.append(f"measured on {self.measured_on} in {self.seconds / 60:.1f} min; records: {self.records}")
        return lines


def tune_model(
    model: ModelLike,
    example_inputs: Sequence[torch.Tensor] | None = None,
    target: TargetLike | None = None,
    budget_minutes: float = 10.0,
    records: str | Path | None = None,
    tracker: Tracker | None = None,
    simulate: bool = False,
    input_shapes: dict[str, Sequence[int]] | None = None,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> TuneResult:
    """Tune the kernels of ``model`` for ``target`` within ``budget_minutes`` and keep the best schedules.

    Args:
        model, example_inputs, target, simulate, input_shapes: as for :func:`edgeq.compile.compile_model`.
        budget_minutes: wall-clock budget; the run stops after the batch that passes it.
        records: folder of the tuning records (default: the target's and CPU's folder in edgeq's cache, the one
            ``edgeq compile`` reads by itself).
        tracker: measure on the boards of a TVM RPC tracker instead of this machine (needed when the target's CPU
            is not this machine's architecture).
        progress: called with a line per step and per measured batch (default: logging at INFO level).
        seed: of MetaSchedule's random choices.

    Raises:
        TuneError: a budget that is not positive, a target of another architecture without a tracker, an
            unreachable tracker or one without boards of the key, or a model without tunable kernels.
        CompileError, TargetError, ModelFileError: as :func:`edgeq.compile.compile_model` raises them.
    """
    if budget_minutes <= 0:
        raise TuneError(f"the budget must be positive; got {budget_minutes} minutes")
    report = progress or logger.info
    started = time.monotonic()
    deadline = started + 60 * budget_minutes
    plan = plan_build(model, example_inputs, target, simulate, input_shapes, report)
    machine = plan.machine
    if tracker is None and machine.compiler is not None:
        raise TuneError(
            f"{plan.target.name} runs on {machine.arch}, not on this machine: measure on a board with --rpc HOST:PORT "
            "--key KEY (a TVM RPC tracker), or tune the simulation on this machine with --simulate"
        )
    measured_on = "this machine" if tracker is None else f"{tracker.host}:{tracker.port} key {tracker.key}"
    if tracker is not None:
        report(f"tracker {tracker.host}:{tracker.port}: {tracker.check()} board(s) with key {tracker.key}")

    llvm_target = tvm.target.Target(machine.llvm)
    dot = dot_product(llvm_target)
    tasks = tuning_tasks(fused_module(plan.module, llvm_target))
    if not tasks:
        raise TuneError(f"{plan.source}: nothing to tune (no int8 convolution or dense kernel)")
    folder = Path(records) if records is not None else records_folder(plan.target.name, machine.llvm)
    database = open_database(folder, create=True)
    runner = tracker.runner() if tracker is not None else local_runner()
    with tempfile.TemporaryDirectory(prefix="edgeq-tune-") as scratch, contextlib.ExitStack() as logs:
        builder = InProcessBuilder(machine, scratch)
        report(f"{len(tasks)} distinct tunable kernels ({sum(t.count for t in tasks)} in the model); measuring their default schedules")
        defaults = _record_defaults(tasks, dot, llvm_target, builder, runner, database)
        logging.getLogger(METASCHEDULE_LOGGER).setLevel(logging.WARNING)  # MetaSchedule's own lines: warnings only
        state = TuningState(tasks, defaults, deadline, report)
        report(f"tuning for up to {clock(state.left())} on {measured_on}; MetaSchedule's logs: {folder / LOGS}")
        loggers = [logs.enter_context(task_log(folder / LOGS, index, task)) for index, task in enumerate(tasks)]
        threads = os.cpu_count() or 1
        contexts = [task.context(llvm_target, dot, threads, seed + i, log) for i, (task, log) in enumerate(zip(tasks, loggers))]
        ms.tune_tasks(
            tasks=contexts,
            task_weights=[float(t.count) for t in tasks],
            work_dir=str(folder),
            max_trials_global=MAX_TRIALS_PER_KERNEL * len(tasks),
            max_trials_per_task=MAX_TRIALS_PER_KERNEL,
            num_trials_per_iter=TRIALS_PER_ITERATION,
            builder=builder,
            runner=runner,
            database=database,
            measure_callbacks=[*ms.MeasureCallback.create("default"), Progress(state)],
            task_scheduler=BudgetScheduler(state),
        )
    kernels = [
        TunedKernel(task.name, task.schedule, task.count, trials, default, _best(database, task))
        for task, trials, default in zip(tasks, state.trials, defaults)
    ]
    return TuneResult(folder, plan.target, dict(machine.llvm), measured_on, kernels, time.monotonic() - started)


def _record_defaults(
    tasks: list[Task], dot: DotProduct, target: tvm.target.Target, builder: InProcessBuilder, runner, database: ms.database.Database
) -> list[float]:
    """Measure each task's default schedule and record it (the baseline every tuned record must beat)."""
    schedules = [task.default_schedule(dot) for task in tasks]
    built = builder.build([BuilderInput(sch.mod, target) for sch in schedules])
    failed = [f"{task.name}: {b.error_msg}" for task, b in zip(tasks, built) if b.error_msg is not None]
    if failed:
        raise TuneError("the default schedules do not build (a bug in edgeq, please report it): " + "; ".join(failed))
    arguments = [ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]) for sch in schedules]
    futures = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", args) for b, args in zip(built, arguments)])
    defaults: list[float] = []
    for task, sch, args, future in zip(tasks, schedules, arguments, futures):
        result = future.result()
        seconds = mean_seconds(result)
        if seconds is None:
            raise TuneError(f"{task.name}: timing the default schedule failed: {result.error_msg}")
        workload = database.commit_workload(task.workload)
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, list(result.run_secs), target, args))
        defaults.append(seconds)
    return defaults


def _best(database: ms.database.Database, task: Task) -> float:
    """The best recorded mean time of ``task`` (this run's records and earlier ones; the default's is one)."""
    (top,) = database.get_top_k(database.commit_workload(task.workload), 1)
    return sum(float(s) for s in top.run_secs) / len(top.run_secs)
