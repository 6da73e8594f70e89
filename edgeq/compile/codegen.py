"""From regions to a compiled library: import each region with TVM's ONNX frontend, lower it to integers,
call the regions from one ``main``, and build with a pipeline chosen by the optimisation level.

Optimisation levels (``-O``):

- ``0``: every Relax op becomes its own kernel (no constant folding, no fusion): slowest, and each kernel maps to
  one op, for debugging and per-op measurements.
- ``1``: constant folding and operator fusion (TVM's default CPU pipeline): requantization and
  activations fuse into the convolution or matmul that produces them.
- ``2`` (default): level 1, and every kernel's outer loops (batch and channels, fused) run in parallel on the CPU's cores
  (measured on ResNet18 here: 2x faster than level 1 with 2 threads).

No level changes the numbers: the integer program is the same at every level (the tests compare every level
with the integer model).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from edgeq.check.report import Placement
from edgeq.compile.lower_integer import Conv2dSettings, integer_accumulator, lower_to_integer
from edgeq.compile.partition import Int32Head, Partition, Region, TensorSpec
from edgeq.errors import CompileError
from edgeq.export.onnx_reader import node_attributes

logger = logging.getLogger(__name__)

OPT_LEVELS = (0, 1, 2)
REGION_ATTRIBUTE = "edgeq.placement"
"""Function attribute of each region function: ``"npu"`` or ``"cpu"``."""

Progress = Callable[[str], None]

_FLOAT_OPS = ("relax.quantize", "relax.dequantize")


def build_relax_module(partition: Partition, progress: Progress) -> relax.IRModule:
    """One Relax module: a function per region (lowered to integers) and ``main`` calling them in order.

    Raises:
        CompileError: TVM cannot import a region, or an NPU region keeps float arithmetic after lowering.
    """
    builder = relax.BlockBuilder()
    functions: list[relax.GlobalVar] = []
    for region in partition.regions:
        progress(f"import and lower {region.name} ({len(region.nodes)} op(s))")
        function = _head_function(region.head) if region.head is not None else _region_function(region)
        functions.append(builder.add_func(_annotated(function, region), region.name))
    _emit_main(builder, partition, functions)
    return relax.transform.DeadCodeElimination()(builder.get())


def _region_function(region: Region) -> relax.Function:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Renaming name")  # TVM makes ONNX names valid identifiers
            imported = from_onnx(region.model, keep_params_in_input=False)
    except Exception as error:  # TVM raises many kinds; the node is in its message
        raise CompileError(f"{region.name}: TVM's ONNX frontend failed on ops {region.nodes[:5]}: {error}") from error
    function = lower_to_integer(imported["main"])
    module = relax.transform.DeadCodeElimination()(tvm.IRModule({"main": function}))
    function = module["main"]
    if region.placement is Placement.NPU:
        leftover = _float_calls(function)
        if leftover:
            raise CompileError(
                f"{region.name}: ops {region.nodes[:5]} are placed on the NPU but {sorted(leftover)} stayed in float "
                "after integer lowering; this is a bug in edgeq's lowering, please report it with the model"
            )
    return function


def _annotated(function: relax.Function, region: Region) -> relax.Function:
    return function.with_attr(REGION_ATTRIBUTE, region.placement.value.lower()).without_attr("global_symbol")


def _head_function(head: Int32Head) -> relax.Function:
    """A Conv/Gemm whose int32 accumulator is a model output, built directly from its integer weights."""
    attributes = node_attributes(head.node)
    builder = relax.BlockBuilder()
    source = relax.Var("source", relax.TensorType(list(head.input_shape), "int8"))
    with builder.function("head", [source]):
        with builder.dataflow():
            if head.node.op_type == "Conv":
                rank = len(head.input_shape) - 2
                conv = Conv2dSettings(
                    tuple(attributes.get("strides", [1] * rank)),
                    tuple(attributes.get("pads", [0] * 2 * rank)),
                    tuple(attributes.get("dilations", [1] * rank)),
                    int(attributes.get("group", 1)),
                )
                acc = integer_accumulator(source, head.weights, head.bias, conv)
            else:
                weights = head.weights.T if attributes.get("transB", 0) else head.weights
                acc = integer_accumulator(source, weights, head.bias)
            output = builder.emit_output(acc)
        builder.emit_func_output(output)
    return builder.get()["head"]


def _float_calls(function: relax.Function) -> set[str]:
    found: set[str] = set()

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name") and expr.op.name in _FLOAT_OPS:
            found.add(expr.op.name)

    relax.analysis.post_order_visit(function.body, visit)
    return found


def _tensor_type(spec: TensorSpec) -> relax.TensorType:
    return relax.TensorType(list(spec.shape), spec.dtype)


def _emit_main(builder: relax.BlockBuilder, partition: Partition, functions: list[relax.GlobalVar]) -> None:
    parameters = [relax.Var(_identifier(spec.source), _tensor_type(spec)) for spec in partition.inputs]
    values: dict[str, relax.Expr] = {spec.name: var for spec, var in zip(partition.inputs, parameters)}
    with builder.function("main", parameters, {"global_symbol": "main"}):
        for region, function in zip(partition.regions, functions):
            result = builder.emit(relax.Call(function, [values[t] for t in region.inputs]), name_hint=region.name)
            if len(region.outputs) == 1:
                values[region.outputs[0]] = result
            else:
                for index, tensor in enumerate(region.outputs):
                    values[tensor] = builder.emit(relax.TupleGetItem(result, index))
        outputs = [values[spec.name] for spec in partition.outputs]
        builder.emit_func_output(outputs[0] if len(outputs) == 1 else relax.Tuple(outputs))


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def check_opt_level(opt_level: int) -> None:
    """Raises CompileError for a level that is not one of ``OPT_LEVELS``."""
    if opt_level not in OPT_LEVELS:
        raise CompileError(f"optimisation level {opt_level} is unknown (allowed: {', '.join(map(str, OPT_LEVELS))})")


def pipeline(opt_level: int, target: tvm.target.Target) -> tvm.transform.Pass:
    """The Relax pipeline of an optimisation level (see the module docstring)."""
    check_opt_level(opt_level)
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern()]
    if opt_level >= 1:
        legalize += [relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if opt_level >= 2:
        legalize.append(parallelize_outer_loops())

    @tvm.transform.module_pass(opt_level=0, name=f"edgeq_O{opt_level}")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = cpu.library_dispatch_passes(target) + legalize + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            return tvm.transform.Sequential(passes)(module)

    return run


@dataclass(frozen=True)
class Machine:
    """What the library is built for."""

    arch: str
    llvm: dict
    compiler: str | None
    """Cross compiler (``aarch64-linux-gnu-g++``), or None for this machine's own."""


def parallelize_outer_loops() -> tvm.transform.Pass:
    """Run the outermost spatial loops of every kernel in parallel (batch and channel loops, fused).

    A schedule changes the order of work, never the arithmetic: results are identical. Reduction loops are left
    alone (the schedule refuses them; such a kernel stays serial).
    """
    from tvm import s_tir, tirx

    @tvm.transform.module_pass(opt_level=0, name="edgeq_parallelize_outer_loops")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        for global_var, function in list(module.functions.items()):
            if not isinstance(function, tirx.PrimFunc):
                continue
            schedule = s_tir.Schedule(function)
            for block in schedule.get_child_blocks(schedule.get_sblock("root")) if _has_root(schedule) else []:
                loops = schedule.get_loops(block)
                try:
                    outer = schedule.fuse(*loops[:2]) if len(loops) >= 2 else loops[0]
                    schedule.parallel(outer)
                except (s_tir.ScheduleError, IndexError):
                    continue
            module[global_var] = schedule.mod["main"]
        return module

    return run


def _has_root(schedule: object) -> bool:
    try:
        schedule.get_sblock("root")
    except Exception:  # a PrimFunc without a root block (already lowered)
        return False
    return True


def build_library(module: relax.IRModule, machine: Machine, opt_level: int, path: str, progress: Progress) -> relax.Executable:
    """Build ``module`` for ``machine`` and export the shared library to ``path``.

    Raises:
        CompileError: the cross compiler is missing, or LLVM / the linker fails.
    """
    if machine.compiler is not None and shutil.which(machine.compiler) is None:
        raise CompileError(
            f"building for {machine.arch} needs the cross compiler {machine.compiler}; install it "
            "(Debian: apt-get install g++-aarch64-linux-gnu; scripts/install.sh does it as root), or compile with "
            "simulate=True (--simulate) for this machine"
        )
    target = tvm.target.Target(machine.llvm)
    progress(f"build for {machine.arch} (LLVM, -O{opt_level})")
    try:
        executable = relax.build(module, target, relax_pipeline=pipeline(opt_level, target))
    except CompileError:
        raise
    except Exception as error:
        raise CompileError(f"TVM failed to build the program for {machine.arch}: {error}") from error
    progress(f"link {machine.arch} library")
    options = {}
    if machine.compiler is not None:
        from tvm.support.cc import cross_compiler

        options["fcompile"] = cross_compiler(machine.compiler)
    try:
        executable.export_library(path, **options)
    except Exception as error:
        raise CompileError(f"linking the {machine.arch} library failed: {error}") from error
    return executable
