"""The float fallback's statistics (mean, variance, sum of float32 tensors) computed in float64, rounded once.

TVM reduces a float32 tensor in float32, one value after the other, so the error of a mean or variance grows with its
length; PyTorch's CPU kernels sum in cascades and compute normalization statistics by Welford's method, within a
few float32 roundings of the exact value. A GroupNorm over 50,176 values (MobileViTv2 at 224: one group of 64 x 28
x 28) then got a variance 2.6e-5 off in relative terms, which moved 28 of its quantized outputs one step from the
integer model's. Summed in float64 and rounded to float32 once, the statistics are the exact ones rounded
(docs/numerics.md "Float fallback"): that region's outputs then equal PyTorch's. Integer reductions are
untouched.
"""

from __future__ import annotations

import tvm
from tvm import relax

STATISTICS = frozenset({"relax.mean", "relax.variance", "relax.sum"})
"""The Relax reductions TVM's ONNX frontend makes of ReduceMean, ReduceSum and InstanceNormalization (GroupNorm)."""


def _float32_statistic(value: relax.Expr) -> bool:
    return (
        isinstance(value, relax.Call)
        and isinstance(value.op, tvm.ir.Op)
        and value.op.name in STATISTICS
        and getattr(value.args[0].ty, "dtype", None) == "float32"
    )


@relax.expr_functor.mutator
class _Widening(relax.PyExprMutator):
    """Each float32 statistic as the same reduction of its input in float64, converted back to float32."""

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if not _float32_statistic(value):
            super().visit_var_binding_(binding)
            return
        wide = self.builder_.emit(relax.op.astype(self.visit_expr(value.args[0]), "float64"))
        reduced = self.builder_.emit(relax.Call(value.op, [wide], value.attrs))
        narrowed = self.builder_.normalize(relax.op.astype(reduced, "float32"))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, narrowed))  # the same variable: its provenance


def widen_float_reductions() -> tvm.transform.Pass:
    """The module pass computing every float32 statistic of every Relax function in float64 (module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="edgeq.WidenFloatReductions")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        for global_var, function in list(module.functions.items()):
            if isinstance(function, relax.Function) and any(_float32_statistic(v) for v in relax.analysis.get_var2val(function).values()):
                widening = _Widening(module)
                widening.builder_.update_func(global_var, widening.visit_expr(function))
                module = widening.builder_.get()
        return module

    return run
