"""What a lowering rule is: a dataflow pattern (``tvm.relax.dpl``) of one QDQ unit and a rewriter, registered
against the ops it lowers in :data:`LOWERING`; a rewriter that finds the match does not fit returns ``None`` and
the matched call stays unchanged."""

from __future__ import annotations

from collections.abc import Callable

from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, rewrite_call, wildcard

from edgeq.ops import OpTable

Lowering = Callable[[relax.Function], relax.Function]
"""A rule run on one function: every match of its pattern rewritten."""

LOWERING: OpTable[Callable[[], Lowering]] = OpTable("lowering rule in compile/lowering/")
"""The factory of the rule that lowers each op's QDQ unit (``lower_to_integer`` runs each once, in the ops'
declaration order)."""


def dq(source: DFPattern | None = None) -> DFPattern:
    """A ``relax.dequantize`` of ``source`` (anything by default) with constant parameters."""
    return is_op("relax.dequantize")(source or wildcard(), is_const(), is_const())


def q(body: DFPattern) -> DFPattern:
    """A ``relax.quantize`` of ``body`` with constant parameters."""
    return is_op("relax.quantize")(body, is_const(), is_const())


class Rule:
    """One QDQ unit: a pattern rooted at its quantize (or op) call, and how to write it in integers."""

    def __init__(self, name: str, pattern: DFPattern, rewrite: Callable[[relax.Call, dict], relax.Expr | None]):
        self.name = name
        self.pattern = pattern
        self.rewrite = rewrite

    def __call__(self, func: relax.Function) -> relax.Function:
        def rewriter(matched: relax.Call, matches: dict) -> relax.Expr:
            integer = self.rewrite(matched, matches)
            return matched if integer is None else integer

        return rewrite_call(self.pattern, rewriter, func)


def function_bindings(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Each variable bound in ``func``'s body -> its value."""
    return {binding.var: binding.value for block in func.body.blocks for binding in block.bindings}
