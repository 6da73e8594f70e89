"""TOSA export: an integer model quantized for a target whose arithmetic rounds half up (an Ethos-U target) as a
TOSA 1.0 flatbuffer (profile PRO-INT), which Arm's Vela compiles for the Ethos-U NPUs and the TOSA reference model
executes exactly as the specification defines it (docs/export.md, "TOSA").

- :func:`to_tosa`: a model (integer model, QDQ ONNX or edgeq TorchScript file) as a ``.tosa`` file.
- :func:`build_tosa`: the TOSA graph of a QDQ model or of a run of its ops (one NPU region).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from edgeq.errors import ExportError
from edgeq.export.sources import ModelLike, quantized_form
from edgeq.export.tosa.writer import TosaGraph, TosaTensor, build_tosa
from edgeq.fileio import atomic_write


def tosa_graph(model: ModelLike, example_inputs: Sequence[torch.Tensor] | None = None) -> TosaGraph:
    """The TOSA graph of a quantized model's integer region (inputs after QuantStub, outputs before DeQuantStub).

    Args:
        model: the integer model (or a calibrated prepared model), an edgeq TorchScript module, or the path of a
            QDQ ONNX or edgeq TorchScript file.
        example_inputs: the inputs giving a PyTorch model's shapes.

    Raises:
        ExportError: a model whose integers do not round half up, an op without a TOSA form, naming the node and
            the op.
    """
    found = quantized_form(model, example_inputs)
    if found is None:
        raise ExportError(f"{type(model).__name__} is not quantized; calibrate or train it and convert it first")
    return build_tosa(found[0])


def to_tosa(model: ModelLike, example_inputs: Sequence[torch.Tensor] | None, path: str | Path) -> TosaGraph:
    """Write the TOSA flatbuffer of a quantized model (:func:`tosa_graph`) to ``path``, atomically."""
    graph = tosa_graph(model, example_inputs)
    with atomic_write(path) as temporary:
        temporary.write_bytes(graph.flatbuffer)
    return graph


__all__ = ["TosaGraph", "TosaTensor", "build_tosa", "to_tosa", "tosa_graph"]
