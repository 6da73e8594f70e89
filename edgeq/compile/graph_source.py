"""The compiled graph of whatever the user has: an artifact (read back), or a model (compiled first)."""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from edgeq.compile.artifact import MANIFEST
from edgeq.compile.compiled_graph import CompiledGraph, load_compiled_graph
from edgeq.errors import TargetError
from edgeq.export.sources import ModelLike
from edgeq.targets import TargetLike, load_target

ARTIFACT_SUFFIX = ".edgeq"


def is_artifact(model: object) -> bool:
    """Whether ``model`` names an artifact: a ``.edgeq`` file (damaged or not), or a zip file with a manifest."""
    if not isinstance(model, (str, Path)):
        return False
    path = Path(model)
    if path.suffix == ARTIFACT_SUFFIX:
        return True
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return MANIFEST in archive.namelist()


def compiled_graph_of(
    model: ModelLike | CompiledGraph,
    example_inputs: Sequence[torch.Tensor] | None = None,
    target: TargetLike | None = None,
) -> CompiledGraph:
    """The compiled graph of ``model``: an artifact's own, or that of compiling ``model`` for ``target`` (built for
    this machine: the graph is the same for every build machine).

    Args:
        model: a compiled graph, a ``.edgeq`` artifact, or anything :func:`edgeq.compile.compile_model` takes.
        example_inputs: inputs of the right shape, for PyTorch models.
        target: for models: the target to compile for (default: the recorded one); for an artifact: checked
            against the one it was compiled for.

    Raises:
        CompiledGraphError: the artifact is missing, damaged or of another schema version.
        TargetError: an unknown target, or an artifact compiled for another target.
        CompileError, ModelFileError: the model cannot be read or compiled.
    """
    if isinstance(model, CompiledGraph):
        return model
    if is_artifact(model):
        graph = load_compiled_graph(model)
        wanted = load_target(target).name if target is not None else graph.target.name
        if wanted != graph.target.name:
            raise TargetError(f"{model}: compiled for {graph.target.name}, not {wanted}; compile the model for {wanted} (or leave out the target)")
        return graph
    from edgeq.compile import compile_model

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / f"model{ARTIFACT_SUFFIX}"
        return compile_model(model, example_inputs, target=target, out=out, simulate=True, progress=lambda _: None).graph
