"""Capturing the user's model as the module-level graph prepare reads: torch.fx, or torch.export when torch.fx
cannot trace it.

Symbolic tracing (torch.fx) is tried first: it keeps the model's own code as module calls, torch functions and
tensor methods. Code it cannot trace (iterating over a tensor's chunks as in ``list(x.chunk(2, 1))``, Python
branches on shapes) is captured with ``torch.export`` instead, and its aten graph rebuilt into the same form
(:mod:`edgeq.quantization.from_export`). The capture used is recorded on the graph (:data:`CAPTURE_ATTRIBUTE`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from enum import Enum

import torch
import torch.fx as fx
from torch import nn

from edgeq.errors import TraceError
from edgeq.quantization.from_export import rebuild_module_graph, visible_stubs
from edgeq.quantization.graph import check_example_inputs, is_leaf_module

logger = logging.getLogger(__name__)


class Capture(str, Enum):
    """How a model's graph was captured."""

    FX = "torch.fx"
    """Symbolic tracing: the default."""
    EXPORT = "torch.export"
    """``torch.export.export(..., strict=False)`` with the example inputs, when symbolic tracing fails."""


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
    name = type(model).__name__
    try:
        captured = fx.GraphModule(model, _Tracer().trace(model), class_name=name)
        setattr(captured, CAPTURE_ATTRIBUTE, Capture.FX)
        return captured
    except Exception as error:  # torch.fx raises TraceError, TypeError, RuntimeError... depending on the code
        fx_failure = f"torch.fx could not trace {name}: {type(error).__name__}: {error}"
    try:
        with visible_stubs(model):
            exported = torch.export.export(model, example_inputs, strict=False)
    except Exception as error:
        raise TraceError(
            f"{fx_failure}; torch.export could not capture it either: {type(error).__name__}: {_first_line(error)} "
            "(the chained exception has the rest). "
            "edgeq needs a static graph: move data-dependent control flow (if/for on tensor values) out of "
            "forward, or wrap it in a leaf module outside the QuantStub/DeQuantStub region"
        ) from error
    try:
        captured = rebuild_module_graph(model, exported)
    except TraceError as error:
        raise TraceError(f"{fx_failure}; torch.export captured it, but {error}") from error
    setattr(captured, CAPTURE_ATTRIBUTE, Capture.EXPORT)
    logger.info("%s; captured it with torch.export", fx_failure)
    return captured


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
