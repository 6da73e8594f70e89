"""From regions to a compiled library: import each region with TVM's ONNX frontend, call the regions from one
``main``, lower it to integers, and build it through the stages of :mod:`edgeq.compile.pipeline`.

Optimisation levels (``-O``):

- ``0``: every Relax op becomes its own kernel with TVM's default, unscheduled form (no constant folding, no
  fusion, no schedules): slowest, and each kernel maps to one op, for debugging and per-op measurements.
- ``1``: constant folding, operator fusion (requantization and activations fuse into the convolution or matmul
  that produces them) and edgeq's kernels and default schedules for the CPU's dot product, on one core.
- ``2`` (default): level 1 with every kernel's tiles run in parallel on the CPU's cores.

No level changes the numbers: the integer program is the same at every level (the tests compare every level
with the integer model).
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from edgeq.check.report import Placement
from edgeq.compile.cpu_features import DotProduct, dot_product
from edgeq.compile.int8_activations import as_int8_activations
from edgeq.compile.integer_relax import Conv2dSettings, integer_accumulator
from edgeq.compile.lowering.rule import LoweringFailure, collected_failures
from edgeq.compile.partition import Int32Head, Partition, Region, TensorSpec
from edgeq.compile.pipeline import Stage, as_pass, lower_integer, run_stages, split_at, stages
from edgeq.compile.provenance import Bindings, KernelCalls, Provenance, import_onnx, node_owners
from edgeq.compile.resize_coordinates import with_resize_coordinates_of_onnx
from edgeq.compile.schedules import KernelSchedule, TunedSchedules, kernel_schedules
from edgeq.errors import CompileError
from edgeq.export.onnx_nodes import node_attributes
from edgeq.targets import Rounding

logger = logging.getLogger(__name__)

REGION_ATTRIBUTE = "edgeq.placement"
"""Function attribute of each region function: ``"npu"`` or ``"cpu"``."""

Progress = Callable[[str], None]

_FLOAT_OPS = ("relax.quantize", "relax.dequantize")


def build_relax_module(
    partition: Partition, progress: Progress, rounding: Rounding = Rounding.HALF_TO_EVEN
) -> tuple[relax.IRModule, Provenance]:
    """One Relax module: a function per region and ``main`` calling them in order, through the pipeline's
    ``lower_integer`` stage; ties round by the target's ``rounding`` (the input quantizers' too). And the graph op
    each binding of a region computes.

    Raises:
        CompileError: TVM cannot import a region, or an NPU region keeps float arithmetic after lowering.
    """
    builder = relax.BlockBuilder()
    functions: list[relax.GlobalVar] = []
    added: dict[str, relax.Function] = {}
    provenance = Provenance()
    for region in partition.regions:
        progress(f"import {region.name} ({len(region.nodes)} op(s))")
        if region.head is not None:
            function = _head_function(region.head)
            provenance.built(region.name, function, region.nodes[0])
        else:
            function = _region_function(region, provenance, builder)
        annotated = _annotated(function, region)
        functions.append(builder.add_func(annotated, region.name))
        running = functions[-1].name_hint
        if running == region.name:
            added[running] = annotated
        else:  # identical to an earlier region, whose function it runs
            provenance.runs_as(region.name, running, function, added[running])
    _emit_main(builder, partition, functions)
    _emit_input_quantizers(builder, partition, rounding)
    progress("lower to integers")
    imported = {region: dict(known) for region, known in provenance.regions.items()}
    try:
        with collected_failures() as failures:
            module = provenance.run(lower_integer(rounding), builder.get())
    except Exception as error:  # TVM raises many kinds
        raise CompileError(f"integer lowering failed: {last_line(error)}") from error
    if failures:
        raise CompileError(_failure_text(failures[0], imported))
    for region, global_var in zip(partition.regions, functions):
        lost = _lost_kernels(module[global_var.name_hint], module)
        if lost:
            raise CompileError(
                f"{region.name}: TVM's ONNX frontend imported ops {region.nodes[:5]} as kernels {sorted(lost)} that "
                "edgeq's integer lowering did not replace; this is a bug in edgeq's lowering, please report it with "
                "the model"
            )
        leftover = _float_calls(module[global_var.name_hint]) if region.placement is Placement.NPU else set()
        if leftover:
            raise CompileError(
                f"{region.name}: ops {region.nodes[:5]} are placed on the NPU but {sorted(leftover)} stayed in float "
                "after integer lowering; this is a bug in edgeq's lowering, please report it with the model"
            )
    return module, provenance


def _failure_text(failure: LoweringFailure, imported: dict[str, Bindings]) -> str:
    """One line naming the ONNX node whose unit a lowering rule refused, and why."""
    ops = next((known[failure.var] for known in imported.values() if failure.var in known), frozenset())
    where = f"{failure.rule} '{', '.join(sorted(ops))}'" if ops else failure.rule
    return f"{where}: {failure.error}"


def last_line(error: Exception) -> str:
    """The last line of an error's text: TVM's own message, without the C++ and Python traceback above it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _region_function(region: Region, provenance: Provenance, builder: relax.BlockBuilder) -> relax.Function:
    """The region imported by TVM's ONNX frontend, its provenance started in ``provenance``; the kernels TVM built for
    its float fallback ops are added to ``builder``'s module."""
    model = as_int8_activations(with_resize_coordinates_of_onnx(region.model))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Renaming name")  # TVM makes ONNX names valid identifiers
            function, node_results, kernels = import_onnx(model, builder.get())
    except CompileError:
        raise
    except Exception as error:  # TVM raises many kinds; the node is in its message
        raise CompileError(f"{region.name}: TVM's ONNX frontend failed on ops {region.nodes[:5]}: {last_line(error)}") from error
    for kernel, body in kernels.items():
        builder.update_func(kernel, body)
    provenance.imported(region.name, function, node_results, node_owners(model, region.node_ops))
    return function


def _annotated(function: relax.Function, region: Region) -> relax.Function:
    return function.with_attr(REGION_ATTRIBUTE, region.placement.value.lower()).without_attr("global_symbol")


def _head_function(head: Int32Head) -> relax.Function:
    """A Conv/Gemm whose int32 accumulator is a model output, built directly from its integer weights."""
    attributes = node_attributes(head.node)
    what = f"{head.node.op_type} '{head.node.name}'"
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
                acc = integer_accumulator(source, head.weights, head.bias, conv, what=what)
            else:
                weights = head.weights.T if attributes.get("transB", 0) else head.weights
                acc = integer_accumulator(source, weights, head.bias, what=what)
            output = builder.emit_output(acc)
        builder.emit_func_output(output)
    return builder.get()["head"]


def _calls(function: relax.Function) -> list[relax.Call]:
    """Every call in ``function``'s body."""
    calls: list[relax.Call] = []
    relax.analysis.post_order_visit(function.body, lambda expr: calls.append(expr) if isinstance(expr, relax.Call) else None)
    return calls


def _op_name(call: relax.Call) -> str | None:
    return getattr(call.op, "name", None)


def _float_calls(function: relax.Function) -> set[str]:
    return {_op_name(call) for call in _calls(function) if _op_name(call) in _FLOAT_OPS}


def _lost_kernels(function: relax.Function, module: relax.IRModule) -> set[str]:
    """The kernels ``function`` calls that are not in ``module``: ones TVM's importer wrote into its own module
    (``call_tir`` of an op it built with ``emit_te``), which only a lowering rule replacing the call removes."""
    defined = module.get_global_vars()
    kernels = [call.args[0] for call in _calls(function) if _op_name(call) == "relax.call_tir"]
    return {kernel.name_hint for kernel in kernels if isinstance(kernel, tvm.ir.GlobalVar) and kernel not in defined}


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


def input_quantizer(index: int) -> str:
    """The library function that quantizes the program's float input ``index`` (manifest: the input's
    ``quantizer``)."""
    return f"quantize_input{index}"


def _emit_input_quantizers(builder: relax.BlockBuilder, partition: Partition, rounding: Rounding) -> None:
    """A function per quantized input, float32 values -> the integers ``main`` takes, as the runtimes quantize
    (docs/runtime.md): ``saturate(nearbyint(x / s) + z)`` with a float32 division, NaN -> ``z``; on a half-up target
    ``floor(x / s)`` plus 1 where the exact remainder is at least 1/2 (``edgeq.numerics.round_half``), as the integer
    model's QuantStub. The runtimes call it on float inputs: one parallel, vectorized pass instead of theirs."""
    for index, spec in enumerate(partition.inputs):
        if spec.quant is None:
            continue
        quant = spec.quant
        shape = [1] * len(spec.shape)
        if quant.axis is not None:
            shape[quant.axis] = len(quant.scales)
        scales = relax.const(np.asarray(quant.scales, np.float32).reshape(shape), "float32")
        zero_points = relax.const(np.asarray(quant.zero_points, np.float64).reshape(shape), "float64")
        limits = np.iinfo(spec.dtype)
        name = input_quantizer(index)
        values = relax.Var("values", relax.TensorType(list(spec.shape), "float32"))
        with builder.function(name, [values], {"global_symbol": name}):
            with builder.dataflow():
                steps = _rounded(R.divide(values, scales), rounding)
                steps = R.where(R.isnan(steps), relax.const(0.0, "float32"), steps)
                shifted = R.add(R.astype(steps, "float64"), zero_points)  # exact: int32 inputs too
                output = builder.emit_output(R.astype(R.clip(shifted, int(limits.min), int(limits.max)), spec.dtype))
            builder.emit_func_output(output)


def _rounded(value: relax.Expr, rounding: Rounding) -> relax.Expr:
    """``value`` (float32) rounded to integers as ``edgeq.numerics.round_half``: ties to even, or up."""
    if rounding is Rounding.HALF_TO_EVEN:
        return R.round(value)
    floor = R.floor(value)
    half_or_more = R.greater_equal(R.subtract(value, floor), relax.const(0.5, "float32"))
    return R.add(floor, R.astype(half_or_more, "float32"))


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


@dataclass(frozen=True)
class Machine:
    """What the library is built for."""

    arch: str
    llvm: dict
    compiler: str | None
    """Cross compiler (``aarch64-linux-gnu-g++``), or None for this machine's own."""

    def export_options(self) -> dict:
        """The options of ``export_library`` that link a library for this machine."""
        if self.compiler is None:
            return {}
        from tvm.support.cc import cross_compiler

        return {"fcompile": cross_compiler(self.compiler)}

    def dot_product(self) -> DotProduct:
        """The int8 dot product the kernels built for this machine use."""
        return dot_product(tvm.target.Target(self.llvm))


@dataclass(frozen=True)
class Library:
    """A built library and the schedule each kernel got."""

    executable: relax.Executable
    kernels: list[KernelSchedule]
    """The schedule of every scheduled kernel (:func:`edgeq.compile.schedules.kernel_schedules`)."""
    calls: KernelCalls
    """Each region's kernel calls with their ops (empty when built without provenance)."""


def scheduled_module(module: relax.IRModule, target: tvm.target.Target, opt_level: int, tuned: TunedSchedules | None = None) -> relax.IRModule:
    """``module`` (integer-lowered) through the pipeline up to ``lower_dataflow`` (the ``schedule`` stage included):
    fused kernels with their schedules, the form the kernel names of :class:`Library` refer to."""
    return run_stages(module, target, _build_stages(opt_level, target, tuned)[0])


def fused_module(module: relax.IRModule, target: tvm.target.Target) -> relax.IRModule:
    """``module`` (integer-lowered) through the pipeline of ``-O2`` up to the ``schedule`` stage: the unscheduled
    fused kernels in their planned layouts, the workloads of ``edgeq tune``."""
    return run_stages(module, target, split_at(_build_stages(2, target)[0], "plan_layout")[0])


def _build_stages(opt_level: int, target: tvm.target.Target, tuned: TunedSchedules | None = None) -> tuple[list[Stage], list[Stage]]:
    """The stages after ``lower_integer`` up to ``lower_dataflow``, which edgeq runs, and the rest, which
    ``relax.build`` runs."""
    _, rest = split_at(stages(opt_level, target, tuned), "lower_integer")
    first = next(index for index, stage in enumerate(rest) if stage.name == "lower_dataflow")
    return rest[:first], rest[first:]


def build_library(
    module: relax.IRModule,
    machine: Machine,
    opt_level: int,
    path: str,
    progress: Progress,
    tuned: TunedSchedules | None = None,
    provenance: Provenance | None = None,
) -> Library:
    """Build ``module`` (integer-lowered) for ``machine`` and export the shared library to ``path``, with the
    tuned schedules of ``tuned`` where it has them; ``provenance`` (the module's, :func:`build_relax_module`) is
    carried through the build to the kernel calls.

    Raises:
        CompileError: the cross compiler is missing, or LLVM / the linker fails.
    """
    if machine.compiler is not None and shutil.which(machine.compiler) is None:
        raise CompileError(
            f"building for {machine.arch} needs the cross compiler {machine.compiler}; install it "
            f"(Debian: apt-get install g++-{machine.arch.replace('_', '-')}-linux-gnu"
            + ("; scripts/install.sh does it as root" if machine.arch == "aarch64" else "")
            + "), or compile with simulate=True (--simulate) for this machine"
        )
    target = tvm.target.Target(machine.llvm)
    front, back = _build_stages(opt_level, target, tuned)
    progress(f"build for {machine.arch} (LLVM, -O{opt_level}, {dot_product(target).name} kernels)")
    try:
        scheduled = run_stages(module, target, front, provenance)
        calls = provenance.kernel_calls(scheduled) if provenance is not None else {}
        executable = relax.build(scheduled, target, relax_pipeline=as_pass(target, back))
    except CompileError:
        raise
    except Exception as error:
        raise CompileError(f"TVM failed to build the program for {machine.arch}: {last_line(error)}") from error
    progress(f"link {machine.arch} library")
    try:
        executable.export_library(path, **machine.export_options())
    except Exception as error:
        raise CompileError(f"linking the {machine.arch} library failed: {last_line(error)}") from error
    return Library(executable, kernel_schedules(scheduled), calls)
