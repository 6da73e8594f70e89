"""What a lowering rule is: a dataflow pattern (``tvm.relax.dpl``) of one QDQ unit and a rewriter, registered
against the ops it lowers in :data:`LOWERING`; a rewriter that finds the match does not fit returns ``None`` and
the matched call stays unchanged. A rewriter that raises an :class:`~edgeq.errors.EdgeqError` inside
:func:`collected_failures` leaves its unit unchanged too, and the failure is recorded with the unit's binding, so
that compile names the ONNX node (an error raised inside TVM's rewriter reaches Python as a bare RuntimeError)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, rewrite_call, wildcard

from edgeq.errors import EdgeqError
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
        failures = _FAILURES.get()

        def rewriter(matched: relax.Call, matches: dict) -> relax.Expr:
            try:
                integer = self.rewrite(matched, matches)
            except EdgeqError as error:
                if failures is None:
                    raise
                bound = {value: var for var, value in function_bindings(func).items()}
                failures.append(LoweringFailure(self.name, bound.get(matched), error))
                return matched
            return matched if integer is None else integer

        return rewrite_call(self.pattern, rewriter, func)


@dataclass(frozen=True)
class LoweringFailure:
    """A unit a rule could not lower: the rule, the unit's binding in the function lowered (None if not bound)."""

    rule: str
    var: relax.Var | None
    error: EdgeqError


_FAILURES: ContextVar[list[LoweringFailure] | None] = ContextVar("edgeq_lowering_failures", default=None)


@contextmanager
def collected_failures() -> Iterator[list[LoweringFailure]]:
    """Within the block, a rule's error leaves its unit unchanged and is appended to the list yielded."""
    failures: list[LoweringFailure] = []
    token = _FAILURES.set(failures)
    try:
        yield failures
    finally:
        _FAILURES.reset(token)


def function_bindings(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Each variable bound in ``func``'s body -> its value."""
    return {binding.var: binding.value for block in func.body.blocks for binding in block.bindings}
