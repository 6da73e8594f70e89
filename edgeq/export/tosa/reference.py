"""Running a TOSA graph with the TOSA reference model (``tosa_reference_model``), which executes it exactly as the
specification defines it: the bit-exact execution of an NPU program's semantics on this machine.

The reference model aborts its process on a graph it finds invalid, so it runs in a child process; a failure is a
:class:`~edgeq.errors.ExportError` with its message.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeq.errors import ExportError
from edgeq.export.tosa.writer import TosaGraph

_GRAPH, _INPUTS, _OUTPUTS = "graph.tosa", "inputs.npz", "outputs.npz"


def run_reference(graph: TosaGraph, inputs: Sequence[np.ndarray], *, timeout_s: float = 600.0) -> list[np.ndarray]:
    """The outputs of ``graph`` for ``inputs``, both in the QDQ graph's order (NCHW images), as the TOSA reference
    model computes them.

    Raises:
        ExportError: a wrong number of inputs, or the reference model refuses the graph (its message).
    """
    if len(inputs) != len(graph.inputs):
        raise ExportError(f"the TOSA graph takes {len(graph.inputs)} inputs; got {len(inputs)}")
    with tempfile.TemporaryDirectory(prefix="edgeq-tosa-") as folder:
        work = Path(folder)
        (work / _GRAPH).write_bytes(graph.flatbuffer)
        arrays = {f"input{i}": spec.to_tosa(np.asarray(v, dtype=np.int8)) for i, (spec, v) in enumerate(zip(graph.inputs, inputs))}
        np.savez(work / _INPUTS, **arrays)
        done = subprocess.run(
            [sys.executable, "-m", __name__, str(work)], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "fails" in line or "ERROR" in line or "failure" in line]
            raise ExportError(f"the TOSA reference model refused the graph: {'; '.join(lines[:3]) or done.stderr.strip()[-500:]}")
        with np.load(work / _OUTPUTS) as saved:
            results = [saved[f"output{i}"] for i in range(len(graph.outputs))]
    return [spec.from_tosa(values) for spec, values in zip(graph.outputs, results)]


def _main(folder: Path) -> int:
    import tosa_reference_model

    with np.load(folder / _INPUTS) as saved:
        inputs = [saved[f"input{i}"] for i in range(len(saved.files))]
    outputs, status = tosa_reference_model.run((folder / _GRAPH).read_bytes(), inputs)
    if status != tosa_reference_model.GraphStatus.TOSA_VALID:
        print(f"ERROR: graph status {status.name}", file=sys.stderr)
        return 1
    np.savez(folder / _OUTPUTS, **{f"output{i}": np.asarray(v) for i, v in enumerate(outputs)})
    return 0


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1])))
