"""visualize_model: the model as the compiler sees it, drawn by Graphviz.

The drawing is the compiled graph (:mod:`edgeq.compile.compiled_graph`): fused ops with shapes, dtypes and
scales, coloured by placement (NPU, CPU integer, CPU float), regions as clusters, tensors with their sizes on the
edges and NPU <-> CPU transitions in red (:mod:`.graph_dot`). ``edgeq visualize MODEL -o GRAPH.svg`` is the same.
"""

from __future__ import annotations

import logging
import shutil
import webbrowser
from collections.abc import Sequence
from pathlib import Path

import graphviz

from edgeq.compile.compiled_graph import CompiledGraph
from edgeq.errors import EdgeqError
from edgeq.fileio import atomic_write
from edgeq.visualize.graph_dot import PLACEMENT_COLOURS, TRANSITION_COLOUR, graph_dot

__all__ = ["PLACEMENT_COLOURS", "TRANSITION_COLOUR", "graph_dot", "graph_svg", "visualize_model"]

logger = logging.getLogger(__name__)


def graph_svg(graph: CompiledGraph) -> str:
    """The drawing of ``graph`` as SVG text.

    Raises:
        EdgeqError: Graphviz's ``dot`` program is not installed.
    """
    if shutil.which("dot") is None:
        raise EdgeqError("Graphviz's dot program is not installed (Debian: apt-get install graphviz; or run scripts/install.sh as root)")
    try:
        return graph_dot(graph).pipe(format="svg", encoding="utf-8")
    except graphviz.CalledProcessError as error:
        raise EdgeqError(f"Graphviz could not lay out the graph: {error.stderr or error}") from None


def visualize_model(
    model: object,
    example_inputs: Sequence[object] | None = None,
    save_path: str | Path = "model.svg",
    show: bool = False,
    target: str | None = None,
) -> Path:
    """Draw the compiled graph of ``model`` into ``save_path`` (SVG).

    Args:
        model: a ``.edgeq`` artifact (drawn as it was compiled), or anything ``compile_model`` takes (a QDQ ONNX
            or edgeq TorchScript file or module, the integer model), compiled first.
        example_inputs: inputs of the right shape, for PyTorch models.
        save_path: where the SVG goes (written atomically).
        show: also open it in the default viewer.
        target: target to compile for (default: the one the model was quantized for); not for artifacts.

    Returns:
        ``save_path``.

    Raises:
        EdgeqError: an unreadable or damaged artifact or model, an unknown target, or Graphviz missing.
    """
    from edgeq.compile.graph_source import compiled_graph_of

    svg = graph_svg(compiled_graph_of(model, example_inputs, target))
    path = Path(save_path)
    with atomic_write(path) as temporary:
        temporary.write_text(svg, encoding="utf-8")
    logger.info("wrote %s", path)
    if show:
        webbrowser.open(path.resolve().as_uri())
    return path
