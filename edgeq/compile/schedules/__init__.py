"""The scheduling stage: edgeq's default schedule for every fused kernel it recognises.

Kernels are recognised by structure (their blocks): edgeq's blocked int8 kernels (:mod:`edgeq.compile.kernels`:
conv2d, 1x1 conv2d, depthwise conv2d, dense), grouped convolutions, pooling (other reductions) and elementwise
chains (requantization, add, clamp, data movement). Each scheduled PrimFunc records its schedule's name in the
``edgeq.schedule`` attribute; :func:`kernel_schedules` lists them. A kernel whose schedule fails keeps TVM's
default form (logged, never an error: schedules never change the numbers, only the speed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tvm
from tvm import s_tir, tirx

from edgeq.compile import kernels
from edgeq.compile.cpu_features import DotProduct
from edgeq.compile.schedules import blocked, generic

logger = logging.getLogger(__name__)

SCHEDULE_ATTRIBUTE = "edgeq.schedule"
"""PrimFunc attribute naming the schedule a kernel got."""

Schedule = Callable[[s_tir.Schedule, DotProduct, bool], None]


def _generic(sch: s_tir.Schedule, dot: DotProduct, parallel: bool) -> None:
    generic.schedule_generic(sch, parallel)


SCHEDULES: dict[str, Schedule] = {
    "conv2d": blocked.schedule_conv2d,
    "conv2d_1x1": blocked.schedule_conv2d,
    "depthwise_conv2d": blocked.schedule_depthwise,
    "dense": blocked.schedule_dense,
    "conv2d_grouped": _generic,
    "pool": _generic,
    "elementwise": _generic,
}
"""Schedule name -> schedule. The name is what :func:`kernel_schedules` reports."""


def classify(sch: s_tir.Schedule) -> str:
    """The schedule name for a fused kernel (unscheduled, in ``sch``), from its blocks."""
    blocks = {sch.get(b).name_hint: sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if kernels.CONV in blocks:
        spatial = [v for v in blocks[kernels.CONV].iter_vars if v.iter_type == v.CommReduce][1:3]
        return "conv2d_1x1" if all(int(v.dom.extent) == 1 for v in spatial) else "conv2d"
    if kernels.DEPTHWISE in blocks:
        return "depthwise_conv2d"
    if kernels.DENSE in blocks:
        return "dense"
    reductions = [name for name, block in blocks.items() if any(v.iter_type == v.CommReduce for v in block.iter_vars)]
    if any("conv" in name for name in reductions):
        return "conv2d_grouped"
    return "pool" if reductions else "elementwise"


def schedule_kernels(dot: DotProduct, parallel: bool) -> tvm.transform.Pass:
    """The module pass applying the default schedules (``parallel``: run tiles on all cores)."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.ScheduleKernels")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        for global_var, function in list(module.functions.items()):
            if not isinstance(function, tirx.PrimFunc) or SCHEDULE_ATTRIBUTE in (function.attrs or {}):
                continue
            sch = s_tir.Schedule(function)
            name = classify(sch)
            try:
                SCHEDULES[name](sch, dot, parallel)
                scheduled = sch.mod["main"]
            except Exception as error:  # noqa: BLE001 - TVM raises many kinds; the kernel keeps its default form
                logger.warning("kernel %s: the %s schedule failed, keeping the default: %s", global_var.name_hint, name, error)
                name, scheduled = "default", function
            module[global_var] = scheduled.with_attr(SCHEDULE_ATTRIBUTE, name)
        return module

    return run


def kernel_schedules(module: tvm.IRModule) -> list[tuple[str, str]]:
    """(kernel name, schedule name) of every scheduled PrimFunc of ``module``, sorted by kernel name."""
    found = []
    for global_var, function in module.functions.items():
        if isinstance(function, tirx.PrimFunc) and SCHEDULE_ATTRIBUTE in (function.attrs or {}):
            found.append((global_var.name_hint, str(function.attrs[SCHEDULE_ATTRIBUTE])))
    return sorted(found)
