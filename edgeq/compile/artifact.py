"""Writing the ``.edgeq`` artifact: one zip file, members stored uncompressed, written atomically.

Members (docs/artifact.md describes each field):

- ``manifest.json``: schema version, edgeq and TVM versions, target, the library's architecture and CPU features,
  inputs and outputs (name, file name, shape, dtype, quantization), placement summary, and the size and sha256
  of every other member;
- ``model.so``: the compiled library (TVM Relax VM executable, function ``main``);
- ``npu_program.json``: the NPU program, per NPU region (derived from the compiled graph);
- ``graph.json``: the compiled graph (:mod:`edgeq.compile.compiled_graph`): ops, tensors, regions and kernels;
- ``check.json``: the check report the placement came from;
- for an Arm Ethos-U target, per NPU region (:mod:`edgeq.compile.vela_regions`): its TOSA file, Vela's command
  stream and encoded weights, and Vela's estimate (``<region>.tosa``, ``.cmd``, ``.weights``, ``.vela.json``).

No member is a pickle. Members are stored (not deflated) so that a small reader can take them by offset, and a
reader verifies every member against the manifest before loading the library.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

from edgeq.errors import CompileError
from edgeq.fileio import atomic_write
from edgeq_runtime.artifact import MANIFEST
from edgeq_runtime.manifest import ManifestError, parse_manifest, schema_version

LIBRARY = "model.so"
NPU_PROGRAM = "npu_program.json"
GRAPH = "graph.json"
CHECK = "check.json"


def json_bytes(data: Any) -> bytes:
    """Stable, readable JSON."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_artifact(path: str | Path, manifest: dict[str, Any], members: dict[str, bytes]) -> Path:
    """Write the artifact at ``path`` (atomically): the manifest, completed with each member's size and sha256,
    then the members.

    Raises:
        CompileError: the manifest breaks a rule of the runtimes' validation (docs/artifact.md), e.g. a model
            without inputs; nothing is written.
    """
    manifest = {
        **manifest,
        "schema_version": schema_version(manifest),
        "members": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in members.items()},
    }
    text = json_bytes(manifest)
    try:
        parse_manifest(text)  # the runtimes' own validation: compile never writes an artifact they refuse
    except ManifestError as error:
        raise CompileError(f"{path}: the artifact would not be valid: {MANIFEST}: {error}") from None
    with atomic_write(path) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST, text)
            for name, data in members.items():
                archive.writestr(name, data)
    return Path(path)
