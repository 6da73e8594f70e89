"""The tuning tasks of a model: its distinct tunable kernels, each with its search space.

A kernel is tunable when its default schedule has decisions (:data:`edgeq.compile.schedules.TUNABLE`: the blocked
int8 convolutions and dense layers). Kernels of the same structure (a shape repeated in the model) are one task,
weighted by how often the model runs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from edgeq.compile.cpu_features import DotProduct
from edgeq.compile.schedules import SCHEDULES, TUNABLE, classify, design_space, worth_parallel
from edgeq.compile.schedules.choices import DEFAULT
from edgeq.compile.tuning_records import as_workload
from edgeq.fileio import make_folder

POPULATION = 64
"""Candidates the evolutionary search keeps per generation (each kernel's space has tens of points, not
thousands: MetaSchedule's default of 512 only costs time)."""


LOGS = "logs"
"""Folder of MetaSchedule's per-task logs, in the records folder."""

TVM_INTRINSICS = "tvm.s_tir.tensor_intrin"


def _without_tvm_intrinsics() -> None:
    """Let ``TuneContext`` import TVM's tensor-intrinsic package without running it.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` parses the intrinsics of every target
    TVM knows (CUDA's alone take 40 s here, the whole package a minute). edgeq's kernels tensorize with its own
    intrinsics (:mod:`edgeq.compile.intrinsics`) and use none of these, so the package is registered unexecuted;
    its submodules (``.x86``, ``.arm_cpu``) still import on demand. A process that imported it already keeps it.
    """
    if TVM_INTRINSICS not in sys.modules:
        spec = importlib.util.find_spec(TVM_INTRINSICS)
        sys.modules[TVM_INTRINSICS] = importlib.util.module_from_spec(spec)


@dataclass(frozen=True)
class Task:
    """One distinct tunable kernel.

    Attributes:
        name: the first kernel's name in the fused module.
        schedule: its schedule's name (``conv2d``, ``conv2d_1x1``, ``depthwise_conv2d``, ``dense``).
        workload: the kernel as MetaSchedule tunes it (:func:`edgeq.compile.tuning_records.as_workload`).
        count: how many kernels of the model have this structure.
        parallel: whether its tiles run on all cores (:func:`edgeq.compile.schedules.worth_parallel`).
    """

    name: str
    schedule: str
    workload: tvm.IRModule
    count: int
    parallel: bool

    def default_schedule(self, dot: DotProduct) -> s_tir.Schedule:
        """The kernel with its default schedule, traced (the first record of every task)."""
        sch = s_tir.Schedule(self.workload)
        SCHEDULES[self.schedule](sch, dot, self.parallel, DEFAULT)
        return sch

    def context(self, target: tvm.target.Target, dot: DotProduct, threads: int, seed: int, logger: logging.Logger) -> ms.TuneContext:
        """The task as MetaSchedule's tuning context: its design space with every decision sampled."""
        _without_tvm_intrinsics()
        space = ms.space_generator.ScheduleFn(
            design_space(self.schedule, dot, self.parallel),
            sch_rules=[],
            postprocs=[],
            mutator_probs={ms.mutator.MutateTileSize(): 1.0},
        )
        strategy = ms.search_strategy.EvolutionarySearch(population_size=POPULATION, init_min_unmeasured=POPULATION // 4, genetic_num_iters=2)
        return ms.TuneContext(
            mod=self.workload,
            target=target,
            space_generator=space,
            search_strategy=strategy,
            task_name=self.name,
            rand_state=seed,
            num_threads=threads,
            logger=logger,
        ).clone()


def tuning_tasks(fused: tvm.IRModule) -> list[Task]:
    """The distinct tunable kernels of a fused module (:func:`edgeq.compile.codegen.fused_module`), by kernel
    name."""
    found: list[Task] = []
    for global_var, function in sorted(fused.functions.items(), key=lambda item: item[0].name_hint):
        if not isinstance(function, tirx.PrimFunc):
            continue
        unscheduled = s_tir.Schedule(function)
        schedule = classify(unscheduled)
        if schedule not in TUNABLE:
            continue
        workload = as_workload(function)
        same = next((i for i, task in enumerate(found) if tvm_ffi.structural_equal(task.workload, workload)), None)
        if same is None:
            found.append(Task(global_var.name_hint, schedule, workload, 1, worth_parallel(unscheduled, schedule)))
        else:
            found[same] = replace(found[same], count=found[same].count + 1)
    return found


@contextlib.contextmanager
def task_log(folder: Path, index: int, task: Task) -> Iterator[logging.Logger]:
    """A logger writing MetaSchedule's lines about ``task`` to ``folder/<index>-<kernel>.log`` (appended), closed on
    exit."""
    make_folder(folder)
    handler = logging.FileHandler(folder / f"{index:02d}-{task.name[:100]}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    logger = logging.getLogger(f"edgeq.tune.task{index}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()
