"""``manifest.json``: parsed and validated before anything of the artifact is used (docs/artifact.md, "Validation").

The structure (keys, types, ranges, names) is the JSON Schema ``manifest.schema.json`` beside this module, checked
with ``jsonschema``; the functions below check what a schema cannot say: distinct names, files and CPU features,
the safe-name rule, scales that stay finite and positive as float32, zero points within the dtype's range, the axis
against the shape, the bytes of a tensor, the library member. Integers are JSON integers only (``true``, ``1.0``
and ``"1"`` are refused). Every refusal is one :class:`ManifestError` naming the field, worded as the C++
runtime's (``runtime/cpp/src/artifact.cc``) where they check alike:
``inputs[0].quant.scale[0] must be a finite positive number, also as float32; got 0``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import numpy as np

from edgeq_runtime.names import SAFE_NAME, is_safe_name

SCHEMA: dict[str, Any] = json.loads(resources.files("edgeq_runtime").joinpath("manifest.schema.json").read_text())
SCHEMA_VERSIONS: tuple[int, ...] = tuple(SCHEMA["properties"]["schema_version"]["enum"])
"""The versions this runtime reads: 2, and 3 (version 2 with ``npu_command_streams``, an Ethos-U build's)."""
SCHEMA_VERSION: int = max(SCHEMA_VERSIONS)
"""The newest version this runtime reads."""
COMMAND_STREAMS_KEY = "npu_command_streams"
"""The manifest key listing an NPU build's command streams (compile writes it; the runtimes, run and perf read it)."""
COMMAND_STREAMS_VERSION = 3
"""The first version with ``npu_command_streams``."""
COMMAND_STREAM_MEMBERS = ("tosa", "command_stream", "weights", "estimate")
"""The members an entry of ``npu_command_streams`` names."""
MAX_DEPTH = 32
"""Arrays and objects nest at most this deep."""
MAX_TENSOR_BYTES = 1 << 31
_SHOWN_CHARACTERS = 60


class ManifestError(ValueError):
    """The manifest is not valid: the message names the field and what it must be."""


def parse_manifest(data: bytes) -> dict[str, Any]:
    """The manifest in ``data``, parsed and validated.

    Raises:
        ManifestError: not JSON (``NaN``, ``Infinity`` and a key twice in one object are not), nested more than
            :data:`MAX_DEPTH` deep, of another schema version, or failing a rule of the module docstring.
    """
    manifest = _parse_json(data)
    _check_version(manifest)
    _check_schema(manifest)
    _check_library(manifest)
    for group in ("inputs", "outputs"):
        _check_tensors(group, manifest[group])
    _check_command_streams(manifest)
    return manifest


def schema_version(manifest: Mapping[str, Any]) -> int:
    """The version a manifest is written with: 3 with ``npu_command_streams``, else 2 (the artifacts of every other
    build stay readable by version-2 runtimes)."""
    return COMMAND_STREAMS_VERSION if COMMAND_STREAMS_KEY in manifest else min(SCHEMA_VERSIONS)


# ---- JSON ---------------------------------------------------------------------------------------------------------


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object of ``pairs``, refusing a key given twice (readers would disagree on which value counts)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {json.dumps(key)} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _parse_json(data: bytes) -> Any:
    try:
        value = json.loads(data, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ManifestError(f"nested more than {MAX_DEPTH} deep") from None
    except ValueError as error:  # also JSONDecodeError and UnicodeDecodeError
        raise ManifestError(f"not valid JSON ({error})") from None
    if _depth(value) > MAX_DEPTH:
        raise ManifestError(f"nested more than {MAX_DEPTH} deep")
    return value


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (0 for a number or a string)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _check_version(manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise ManifestError("not a JSON object")
    version = manifest.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        hint = "update edgeq-runtime" if newer else "recompile the model"
        readable = " and ".join(map(str, SCHEMA_VERSIONS))
        raise ManifestError(f"schema version {version!r}; this runtime reads versions {readable} ({hint})")


# ---- the schema ---------------------------------------------------------------------------------------------------


def field(path: Iterable[str | int]) -> str:
    """A field path as messages write it.

    >>> field(["inputs", 0, "quant", "scale", 3]), field(["members", "model.so", "size"])
    ('inputs[0].quant.scale[3]', 'members["model.so"].size')
    """
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        elif key.isidentifier():
            text += f".{key}" if text else key
        else:
            text += f"[{json.dumps(key)}]"
    return text


def _shown(value: Any) -> str:
    """``value`` as JSON, cut to :data:`_SHOWN_CHARACTERS`."""
    text = json.dumps(value)
    return text if len(text) <= _SHOWN_CHARACTERS else text[: _SHOWN_CHARACTERS - 3] + "..."


def _alternatives(values: list[Any]) -> str:
    """``"a", "b" or "c"``."""
    shown = [json.dumps(value) for value in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def _problem(path: Iterable[str | int], problem: str) -> ManifestError:
    return ManifestError(f"{field(path)} {problem}")


def _must(path: Iterable[str | int], expectation: str, value: Any) -> ManifestError:
    return _problem(path, f"must be {expectation}; got {_shown(value)}")


@functools.cache
def _validator() -> Any:
    """A Draft 2020-12 validator of :data:`SCHEMA` whose integers exclude ``1.0`` (as its draft counts them)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    strict = base.TYPE_CHECKER.redefine("integer", lambda _, value: type(value) is int)  # bool is an int subclass
    return jsonschema.validators.extend(base, type_checker=strict)(SCHEMA)


def _check_schema(manifest: dict[str, Any]) -> None:
    """The manifest against :data:`SCHEMA`; of several errors, the shallowest is told (the first of those)."""
    error = min(_validator().iter_errors(manifest), key=lambda e: len(e.absolute_path), default=None)
    if error is None:
        return
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        raise _problem([*path, missing], "is missing")
    if error.validator == "additionalProperties":
        known = list(error.schema["properties"])
        unknown = next(key for key in error.instance if key not in known)
        raise _problem([*path, unknown], f"is not a known key (known: {', '.join(known)})")
    if error.validator in ("enum", "const"):
        values = error.validator_value if error.validator == "enum" else [error.validator_value]
        raise _must(path, _alternatives(values), error.instance)
    raise _must(path, error.schema.get("description", error.message), error.instance)


# ---- what the schema cannot say ----------------------------------------------------------------------------------


def _check_library(manifest: dict[str, Any]) -> None:
    library = manifest["library"]
    if library["member"] not in manifest["members"]:
        raise _problem(["library", "member"], f"must name one of the members; got {_shown(library['member'])}")
    features = library["cpu_features"]
    _check_distinct([(["library", "cpu_features", index], name) for index, name in enumerate(features)])


def _check_distinct(fields: list[tuple[list[str | int], str]]) -> None:
    """No two of the ``(path, value)`` ``fields`` alike: of two, the second repeats the first."""
    first: dict[str, list[str | int]] = {}
    for path, value in fields:
        if value in first:
            raise _problem(path, f"repeats {field(first[value])} ({_shown(value)})")
        first[value] = path


def _check_tensors(group: str, tensors: list[dict[str, Any]]) -> None:
    """Each tensor's own rules, then names and files distinct."""
    for index, tensor in enumerate(tensors):
        path = [group, index]
        if not is_safe_name(tensor["file"]):
            rule = f"plain file names only: {SAFE_NAME.pattern}"
            raise _problem([*path, "file"], f"{tensor['file']!r} is not allowed ({rule})")
        _check_bytes(path, tensor)
        _check_quant([*path, "quant"], tensor)
        if "quantizer" in tensor and tensor["quant"] is None:
            raise _problem([*path, "quantizer"], "is for quantized inputs only (quant is null)")
    for key in ("name", "file"):
        _check_distinct([([group, index, key], tensor[key]) for index, tensor in enumerate(tensors)])


def _check_bytes(path: list[str | int], tensor: Mapping[str, Any]) -> None:
    if math.prod(tensor["shape"]) * np.dtype(tensor["dtype"]).itemsize > MAX_TENSOR_BYTES:
        raise _problem([*path, "shape"], f"makes a tensor of more than 2^31 bytes ({tensor['dtype']})")


def _check_quant(path: list[str | int], tensor: Mapping[str, Any]) -> None:
    """Scales finite and positive as float32, one zero point per scale within the dtype's range, the axis."""
    quant, dtype = tensor["quant"], np.dtype(tensor["dtype"])
    if quant is None:
        return
    if not np.issubdtype(dtype, np.integer):
        raise _problem(path, f"must be null for a {dtype} tensor")
    scales, zero_points = quant["scale"], quant["zero_point"]
    for index, scale in enumerate(scales):
        if not _positive_float32(scale):
            raise _must([*path, "scale", index], "a finite positive number, also as float32", scale)
    if len(zero_points) != len(scales):
        problem = f"must list as many zero points as there are scales ({len(scales)}); got {len(zero_points)}"
        raise _problem([*path, "zero_point"], problem)
    limits = np.iinfo(dtype)
    for index, zero_point in enumerate(zero_points):
        if not limits.min <= zero_point <= limits.max:
            expectation = f"an integer from {limits.min} to {limits.max} ({dtype})"
            raise _must([*path, "zero_point", index], expectation, zero_point)
    _check_axis(path, tensor["shape"], quant["axis"], len(scales))


def _positive_float32(value: float) -> bool:
    """Whether ``value`` is finite and positive, also once rounded to float32 (the scale the runtimes use)."""
    try:
        double = float(value)
    except OverflowError:  # an integer past the float range
        return False
    with np.errstate(over="ignore", under="ignore"):
        single = np.float32(double)
    return math.isfinite(double) and bool(np.isfinite(single)) and single > 0


def _check_axis(path: list[str | int], shape: list[int], axis: int | None, scales: int) -> None:
    """Without an axis, one scale; with one, a dimension of the tensor, and one scale or one per index of it."""
    if axis is None:
        if scales != 1:
            raise _problem([*path, "scale"], f"must list one scale when axis is null; got {scales}")
        return
    if not shape:
        raise _must([*path, "axis"], "null for a tensor without dimensions", axis)
    if not 0 <= axis < len(shape):
        raise _must([*path, "axis"], f"an integer from 0 to {len(shape) - 1} (a dimension of the tensor)", axis)
    if scales not in (1, shape[axis]):
        raise _problem([*path, "scale"], f"must list 1 or {shape[axis]} scales (shape[{axis}]); got {scales}")


def _check_command_streams(manifest: dict[str, Any]) -> None:
    """``npu_command_streams`` only from version 3; distinct regions; each names members of the artifact, distinct."""
    streams = manifest.get(COMMAND_STREAMS_KEY)
    if streams is None:
        return
    if manifest["schema_version"] < COMMAND_STREAMS_VERSION:
        raise _problem([COMMAND_STREAMS_KEY], f"needs schema version {COMMAND_STREAMS_VERSION}; got {manifest['schema_version']}")
    _check_distinct([([COMMAND_STREAMS_KEY, index, "region"], stream["region"]) for index, stream in enumerate(streams)])
    named = []
    for index, stream in enumerate(streams):
        for key in COMMAND_STREAM_MEMBERS:
            path: list[str | int] = [COMMAND_STREAMS_KEY, index, key]
            if stream[key] not in manifest["members"]:
                raise _problem(path, f"must name one of the members; got {_shown(stream[key])}")
            named.append((path, stream[key]))
    _check_distinct(named)
