"""The build pipeline: a named list of stages from the imported Relax module to VM code.

| stage | passes | levels |
|---|---|---|
| ``lower_integer`` | edgeq's integer lowering of every Relax function (:func:`lower_integer`) | all |
| ``widen_reductions`` | the float fallback's float32 means, variances and sums computed in float64 (:mod:`.float_reductions`) | all |
| ``dispatch`` | TVM's CPU library dispatch (sampling, sort/scan) | all |
| ``select_kernels`` | legalization; int8 conv2d / matmul become edgeq's blocked kernels (:mod:`.select_kernels`) | 1, 2 |
| ``legalize`` | TVM's legalization of every op into its default kernel | 0 |
| ``fuse`` | op patterns (:mod:`.fusion_patterns`: lookup tables elementwise, int8 widened in the kernels reading it), constant folding, operator fusion, FuseTIR | 1, 2 |
| ``plan_layout`` | int8 activations between convolution kernels stored in blocks of channels (:mod:`.layout_plan`) | 1, 2 |
| ``schedule`` | tuned schedules from tuning records, else edgeq's default schedules (:mod:`edgeq.compile.schedules`); parallel tiles at level 2 | 1, 2 |
| ``lower_dataflow`` | TVM's dataflow lowering | all |
| ``finalize`` | TVM's memory planning and VM lowering | all |

The kernel strategy comes from the target's CPU features (:func:`edgeq.compile.cpu_features.dot_product`).
"""  # noqa: E501, W505 (a table's rows)

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu

from edgeq.compile.cpu_features import dot_product
from edgeq.compile.float_reductions import widen_float_reductions
from edgeq.compile.fusion_patterns import fusion_patterns
from edgeq.compile.layout_plan import plan_layouts
from edgeq.compile.lower_integer import lower_to_integer
from edgeq.compile.provenance import Provenance
from edgeq.compile.schedules import TunedSchedules, schedule_kernels
from edgeq.compile.select_kernels import select_kernels
from edgeq.errors import CompileError
from edgeq.targets import Rounding

OPT_LEVELS = (0, 1, 2)


@dataclass(frozen=True)
class Stage:
    """One named step of the pipeline."""

    name: str
    passes: tuple[tvm.transform.Pass, ...]


def check_opt_level(opt_level: int) -> None:
    """Raises CompileError for a level that is not one of ``OPT_LEVELS``."""
    if opt_level not in OPT_LEVELS:
        raise CompileError(f"optimisation level {opt_level} is unknown (allowed: {', '.join(map(str, OPT_LEVELS))})")


def lower_integer(rounding: Rounding = Rounding.HALF_TO_EVEN) -> tvm.transform.Pass:
    """edgeq's integer lowering (:func:`edgeq.compile.lower_integer.lower_to_integer`) of every Relax function, ties
    rounded by the target's ``rounding``, as a registered module pass (``edgeq.LowerInteger``); dead float ops are
    removed."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.LowerInteger")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        for global_var, function in list(module.functions.items()):
            if isinstance(function, relax.Function):
                module[global_var] = lower_to_integer(function, rounding)
        return relax.transform.DeadCodeElimination()(module)

    return run


def stages(opt_level: int, target: tvm.target.Target, tuned: TunedSchedules | None = None) -> list[Stage]:
    """The stages of an optimisation level for ``target`` (see the module's table); ``tuned``: tuning records
    the ``schedule`` stage takes tuned schedules from."""
    check_opt_level(opt_level)
    listed = [
        Stage("lower_integer", (lower_integer(),)),
        Stage("widen_reductions", (widen_float_reductions(),)),
        Stage("dispatch", tuple(cpu.library_dispatch_passes(target))),
    ]
    if opt_level == 0:
        listed.append(Stage("legalize", (relax.transform.LegalizeOps(),)))
    else:
        dot = dot_product(target)
        listed += [
            Stage("select_kernels", (select_kernels(dot),)),
            Stage(
                "fuse",
                (relax.transform.AnnotateTIROpPattern(), fusion_patterns(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
                 relax.transform.FuseTIR()),
            ),
            Stage("plan_layout", (plan_layouts(dot),)),
            Stage("schedule", (schedule_kernels(dot, parallel=opt_level >= 2, tuned=tuned),)),
        ]
    listed += [
        Stage("lower_dataflow", tuple(cpu.dataflow_lower_passes(target))),
        Stage("finalize", tuple(cpu.finalize_passes(target))),
    ]
    return listed


def run_stages(module: tvm.IRModule, target: tvm.target.Target, selected: list[Stage], provenance: Provenance | None = None) -> tvm.IRModule:
    """Apply ``selected`` stages to ``module`` in order, under ``target``; ``provenance`` (the module's) is carried
    through every pass."""
    with target:
        for stage in selected:
            if provenance is None:
                module = tvm.transform.Sequential(list(stage.passes), name=f"edgeq.{stage.name}")(module)
                continue
            for step in stage.passes:
                module = provenance.run(step, module)
    return module


def as_pass(target: tvm.target.Target, selected: list[Stage]) -> tvm.transform.Pass:
    """``selected`` stages as one module pass (for ``relax.build``)."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.Pipeline")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        return run_stages(module, target, selected)

    return run


def split_at(selected: list[Stage], name: str) -> tuple[list[Stage], list[Stage]]:
    """The stages up to and including ``name``, and the rest (all and none if ``name`` is not among them)."""
    names = [stage.name for stage in selected]
    if name not in names:
        return selected, []
    index = names.index(name) + 1
    return selected[:index], selected[index:]
