"""The scheduling stage: edgeq's default schedule for every fused kernel it recognises.

Kernels are recognised by structure (their blocks): edgeq's blocked int8 kernels (:mod:`edgeq.compile.kernels`:
conv2d and 1x1 conv2d, grouped or not, depthwise conv2d, dense), TVM's convolutions (float ones), pooling (other
reductions) and elementwise chains (requantization, add, clamp, data movement). Each scheduled PrimFunc records its
schedule's name in the ``edgeq.schedule`` attribute; :func:`kernel_schedules` lists them. A kernel whose schedule
fails keeps TVM's default form (logged, never an error: schedules never change the numbers, only the speed).

The blocked kernels (:data:`TUNABLE`) are also what ``edgeq tune`` searches: their schedules take their
decisions from a :class:`~.choices.Choices`. A kernel with a record in the tuning records given to
:func:`schedule_kernels` gets the record's schedule instead of the default (``edgeq.tuned`` attribute).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import SBlockRealize

from edgeq.compile import kernels
from edgeq.compile.cpu_features import DotProduct
from edgeq.compile.schedules import blocked, generic
from edgeq.compile.schedules.choices import DEFAULT, SAMPLED, Choices

logger = logging.getLogger(__name__)

SCHEDULE_ATTRIBUTE = "edgeq.schedule"
"""PrimFunc attribute naming the schedule a kernel got."""

TUNED_ATTRIBUTE = "edgeq.tuned"
"""PrimFunc attribute set on a kernel whose schedule came from tuning records."""

PARALLEL_ATTRIBUTE = "edgeq.parallel"
"""PrimFunc attribute set on a kernel whose tiles run on all cores."""

PARALLEL_ITERATIONS = {"conv2d": 1 << 18, "conv2d_1x1": 1 << 18, "dense": 1 << 18}
"""Iterations (:func:`iterations`) from which a kernel runs on all cores, by schedule (others:
:data:`PARALLEL_ITERATIONS_OTHERS`): below, waking the thread pool costs more than the work saves. The blocked
int8 kernels do about 16 multiply-accumulates per instruction, the others one or a few operations. Measured here
(2-core VM): the digits CNN, all of whose kernels are below, 78 -> 55 us per inference; torchvision models at
224x224 within the run-to-run noise (+-5 %)."""

PARALLEL_ITERATIONS_OTHERS = 1 << 16

Schedule = Callable[[s_tir.Schedule, DotProduct, bool, Choices], None]

LOOPS = "loops"
"""The schedule name of a kernel written as plain loops in one opaque block (TVM's extern kernels: the scan and
sort its CPU dispatch writes for cumsum, topk, argsort), which no schedule primitive reads: it keeps TVM's form."""


def root_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    """The blocks inside the outermost block of the kernel in ``sch`` (``root`` for TE's kernels, the op's own
    name for an extern kernel, which has none inside: :data:`LOOPS`)."""
    body = sch.mod["main"].body
    if not isinstance(body, SBlockRealize):
        return []
    return list(sch.get_child_blocks(sch.get_sblock(body.block.name_hint)))


def _as_written(sch: s_tir.Schedule, dot: DotProduct, parallel: bool, choose: Choices) -> None:
    """No schedule: the kernel's loops stay as TVM wrote them."""


def _generic(sch: s_tir.Schedule, dot: DotProduct, parallel: bool, choose: Choices) -> None:
    generic.schedule_generic(sch, parallel)


SCHEDULES: dict[str, Schedule] = {
    "conv2d": blocked.schedule_conv2d,
    "conv2d_1x1": blocked.schedule_conv2d,
    "depthwise_conv2d": blocked.schedule_depthwise,
    "dense": blocked.schedule_dense,
    "conv2d_generic": _generic,
    "pool": _generic,
    "elementwise": _generic,
    LOOPS: _as_written,
}
"""Schedule name -> schedule. The name is what :func:`kernel_schedules` reports."""

TUNABLE = ("conv2d", "conv2d_1x1", "depthwise_conv2d", "dense")
"""The schedules with decisions to tune (the blocked int8 kernels: nearly all of a CNN's time)."""


class TunedSchedules(Protocol):
    """Where :func:`schedule_kernels` finds tuned schedules (:class:`edgeq.compile.tuning_records.TuningRecords`)."""

    def schedule(self, function: tirx.PrimFunc) -> s_tir.Schedule | None:
        """The tuned schedule of ``function``, or None if it has no record."""
        ...


@dataclass(frozen=True)
class KernelSchedule:
    """The schedule one kernel of a library got."""

    kernel: str
    schedule: str
    tuned: bool
    parallel: bool


def classify(sch: s_tir.Schedule) -> str:
    """The schedule name for a fused kernel (unscheduled, in ``sch``), from its blocks (:data:`LOOPS` without any)."""
    blocks = {sch.get(b).name_hint: sch.get(b) for b in root_blocks(sch)}
    if not blocks:
        return LOOPS
    if kernels.CONV in blocks:
        spatial = [v for v in blocks[kernels.CONV].iter_vars if v.iter_type == v.CommReduce][1:3]
        return "conv2d_1x1" if all(int(v.dom.extent) == 1 for v in spatial) else "conv2d"
    if kernels.DEPTHWISE in blocks:
        return "depthwise_conv2d"
    if kernels.DENSE in blocks:
        return "dense"
    reductions = [name for name, block in blocks.items() if any(v.iter_type == v.CommReduce for v in block.iter_vars)]
    if any("conv" in name for name in reductions):
        return "conv2d_generic"
    return "pool" if reductions else "elementwise"


def iterations(sch: s_tir.Schedule) -> int:
    """The scalar iterations of a kernel's blocks (``sch``, unscheduled): the multiply-accumulates of a
    convolution, the elements of each step of an elementwise chain."""
    total = 0
    for block in root_blocks(sch):
        total += math.prod(int(var.dom.extent) for var in sch.get(block).iter_vars)
    return total


def worth_parallel(sch: s_tir.Schedule, name: str) -> bool:
    """Whether the kernel in ``sch`` (unscheduled, of schedule ``name``) does enough work to run on all cores
    (:data:`PARALLEL_ITERATIONS`)."""
    return iterations(sch) >= PARALLEL_ITERATIONS.get(name, PARALLEL_ITERATIONS_OTHERS)


def design_space(name: str, dot: DotProduct, parallel: bool) -> Callable[[s_tir.Schedule], None]:
    """The tuner's search space of a :data:`TUNABLE` kernel: its schedule with every decision sampled."""
    schedule = SCHEDULES[name]
    return lambda sch: schedule(sch, dot, parallel, SAMPLED)


def _scheduled(function: tirx.PrimFunc, name: str, dot: DotProduct, parallel: bool, tuned: TunedSchedules | None, kernel: str) -> tirx.PrimFunc:
    """``function`` with its tuned schedule if it has one, else its default schedule, else unchanged."""
    record = tuned.schedule(function) if tuned is not None and name in TUNABLE else None
    if record is not None:  # searched on all cores or on one as the kernel was then: its trace says which
        on_all_cores = any(inst.kind.name == "Parallel" for inst in record.trace.insts)
        return record.mod["main"].with_attr(SCHEDULE_ATTRIBUTE, name).with_attr(TUNED_ATTRIBUTE, True).with_attr(PARALLEL_ATTRIBUTE, on_all_cores)
    sch = s_tir.Schedule(function)
    try:
        SCHEDULES[name](sch, dot, parallel, DEFAULT)
    except Exception as error:  # noqa: BLE001 - TVM raises many kinds; the kernel keeps its default form
        logger.warning("kernel %s: the %s schedule failed, keeping the default: %s", kernel, name, error)
        return function.with_attr(SCHEDULE_ATTRIBUTE, "default").with_attr(PARALLEL_ATTRIBUTE, False)
    return sch.mod["main"].with_attr(SCHEDULE_ATTRIBUTE, name).with_attr(PARALLEL_ATTRIBUTE, parallel)


def schedule_kernels(dot: DotProduct, parallel: bool, tuned: TunedSchedules | None = None) -> tvm.transform.Pass:
    """The module pass applying the schedules (``parallel``: run the tiles of kernels worth it on all cores,
    :func:`worth_parallel`): a kernel's tuned schedule from ``tuned`` if it has one, else its default schedule."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.ScheduleKernels")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        for global_var, function in list(module.functions.items()):
            if not isinstance(function, tirx.PrimFunc) or SCHEDULE_ATTRIBUTE in (function.attrs or {}):
                continue
            unscheduled = s_tir.Schedule(function)
            name = classify(unscheduled)
            on_all_cores = parallel and worth_parallel(unscheduled, name)
            module[global_var] = _scheduled(function, name, dot, on_all_cores, tuned, global_var.name_hint)
        return module

    return run


def kernel_schedules(module: tvm.IRModule) -> list[KernelSchedule]:
    """The schedule of every scheduled PrimFunc of ``module``, sorted by kernel name."""
    found = []
    for global_var, function in module.functions.items():
        attrs = (function.attrs or {}) if isinstance(function, tirx.PrimFunc) else {}
        if SCHEDULE_ATTRIBUTE in attrs:
            found.append(
                KernelSchedule(
                    global_var.name_hint,
                    str(attrs[SCHEDULE_ATTRIBUTE]),
                    bool(attrs.get(TUNED_ATTRIBUTE, False)),
                    bool(attrs.get(PARALLEL_ATTRIBUTE, False)),
                )
            )
    return sorted(found, key=lambda k: k.kernel)
