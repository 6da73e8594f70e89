"""Capturing the user's model as the module-level graph prepare reads: torch.fx, or torch.export when torch.fx
cannot trace it.

Symbolic tracing (torch.fx) is tried first: it keeps the model's own code as module calls, torch functions and
tensor methods. Code it cannot trace (iterating over a tensor's chunks as in ``list(x.chunk(2, 1))``, Python
branches on shapes) is captured with ``torch.export`` instead, and its aten graph rebuilt into the same form
(:mod:`edgeq.quantization.from_export`). torch.export captures the batch size as a symbol, so that the model
calibrates, trains and converts at any batch size as a traced one does, unless the model's code fixes it. The
capture used is recorded on the graph (:data:`CAPTURE_ATTRIBUTE`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from enum import Enum

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from edgeq.errors import TraceError, first_line
from edgeq.quantization.from_export import rebuild_module_graph, visible_stubs
from edgeq.quantization.graph import check_example_inputs, is_leaf_module, unshare_stateless_modules

logger = logging.getLogger(__name__)


class Capture(str, Enum):
    """How a model's graph was captured."""

    FX = "torch.fx"
    """Symbolic tracing: the default."""
    EXPORT = "torch.export"
    """``torch.export.export(..., strict=False)`` with a symbolic batch size, when symbolic tracing fails: the
    graph runs at any batch size."""
    EXPORT_FIXED_BATCH = "torch.export at the example's batch size"
    """``torch.export.export(..., strict=False)`` at the example inputs' shapes, when the model's code fixes the
    batch size: the graph runs at the example's batch size only."""
    PT2E = "torchao PT2E"
    """A graph converted by torchao's ``convert_pt2e``, rebuilt by :func:`edgeq.quantization.from_pt2e`."""


CAPTURE_ATTRIBUTE = "edgeq_capture"
"""Attribute of a captured graph and of the model prepared from it: its :class:`Capture`."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with edgeq's stubs as leaves (they must stay visible in the graph)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_leaf_module(module, qualified_name)


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """The module-level graph of a deep copy of ``model`` (the user's model is never modified).

    Raises:
        QuantizationError: ``example_inputs`` is not a tuple.
        TraceError: neither torch.fx nor torch.export can capture the model (data-dependent control flow...), or
            torch.export's graph has a module call edgeq cannot rebuild.
    """
    example_inputs = check_example_inputs(example_inputs)
    model = copy.deepcopy(model)
    unshare_stateless_modules(model)
    name = type(model).__name__
    try:
        captured = fx.GraphModule(model, _Tracer().trace(model), class_name=name)
        setattr(captured, CAPTURE_ATTRIBUTE, Capture.FX)
        return captured
    except Exception as error:  # torch.fx raises TraceError, TypeError, RuntimeError... depending on the code
        fx_failure = f"torch.fx could not trace {name}: {type(error).__name__}: {error}"
    try:
        exported, how = _export(model, example_inputs)
    except Exception as error:
        raise TraceError(
            f"{fx_failure}; torch.export could not capture it either: {type(error).__name__}: {first_line(error)} "
            "(the chained exception has the rest). "
            "edgeq needs a static graph: move data-dependent control flow (if/for on tensor values) out of "
            "forward, or wrap it in a leaf module outside the QuantStub/DeQuantStub region"
        ) from error
    try:
        captured = rebuild_module_graph(model, exported)
    except TraceError as error:
        raise TraceError(f"{fx_failure}; torch.export captured it, but {error}") from error
    setattr(captured, CAPTURE_ATTRIBUTE, how)
    logger.info("%s; captured it with torch.export", fx_failure)
    return captured


def _export(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[ExportedProgram, Capture]:
    """torch.export's capture of ``model`` (stubs visible), for any batch size where the model's code allows.

    The first dimension of every tensor input is declared ``Dim.AUTO``: torch.export keeps it symbolic unless the
    code fixes it, and the rebuilt graph reads sizes from the input (``x.size(0)``) instead of holding the
    example's numbers. torch.export fixes a dimension of size 1 (its 0/1 specialization), so an example batch of 1
    is captured at 2, its samples repeated (the capture runs on fake tensors: values do not matter); the graph is
    therefore the code's path at batch sizes above 1. A model whose code fixes the batch size (or that
    torch.export captures only at static shapes) is captured at the example's shapes, as the INFO log says.
    """
    batched = tuple(_at_least_two(x) for x in example_inputs)
    dynamic = tuple({0: Dim.AUTO} if _has_batch(x) else None for x in example_inputs)
    with visible_stubs(model):
        try:
            exported = torch.export.export(model, batched, dynamic_shapes=dynamic, strict=False)
            if _batch_is_symbolic(exported):
                return exported, Capture.EXPORT
            reason = "its code fixes the batch size"
        except Exception as error:  # some code is traceable at static sizes only; the static capture may still work
            reason = f"capturing it at any batch size failed: {type(error).__name__}: {first_line(error)}"
        exported = torch.export.export(model, example_inputs, strict=False)
    logger.info(
        "%s: %s, so it is captured at the example's shapes: calibrate and train it at batch size %s",
        type(model).__name__,
        reason,
        "/".join(sorted({str(x.shape[0]) for x in example_inputs if _has_batch(x)})),
    )
    return exported, Capture.EXPORT_FIXED_BATCH


def _has_batch(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _at_least_two(value: object) -> object:
    """``value`` with its samples repeated to a batch of 2 if it is a tensor with a batch of 1."""
    if _has_batch(value) and value.shape[0] == 1:
        return value.expand(2, *value.shape[1:]).contiguous()
    return value


def _batch_is_symbolic(exported: ExportedProgram) -> bool:
    """Whether every tensor input with a batch dimension kept it symbolic in ``exported``."""
    user_inputs = set(exported.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in exported.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    return not any(is_concrete_int(v.shape[0]) for v in values if _has_batch(v))
