"""Reading a ``.edgeq`` artifact safely: every check happens before any library is loaded.

The artifact is a zip whose members are stored uncompressed: ``manifest.json`` first, then the members the
manifest lists with their size and sha256 (docs/artifact.md). A reader refuses, with a message naming the file:
a missing or truncated file, a manifest that is not JSON or of another schema version, a member missing, added,
compressed, of the wrong size or with another checksum, a member name that could escape a folder, and sizes past
the limits below.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBER_BYTES = 1 << 31
MAX_MEMBERS = 64
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(Exception):
    """An artifact cannot be used: the message says which file and why."""


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: its manifest and its members' bytes."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]

    @classmethod
    def read(cls, path: str | Path) -> Artifact:
        """Read and verify ``path``.

        Raises:
            ArtifactError: see the module docstring.
        """
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file")
        try:
            with zipfile.ZipFile(path) as archive:
                entries = archive.infolist()
                manifest = _manifest(path, archive, entries)
                members = _members(path, archive, entries, manifest)
        except zipfile.BadZipFile as error:
            raise ArtifactError(f"{path}: not an edgeq artifact, or truncated ({error})") from None
        return cls(path, manifest, members)


def _manifest(path: Path, archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo]) -> dict[str, Any]:
    if len(entries) > MAX_MEMBERS:
        raise ArtifactError(f"{path}: {len(entries)} members (allowed: at most {MAX_MEMBERS})")
    if not entries or entries[0].filename != MANIFEST:
        raise ArtifactError(f"{path}: the first member must be {MANIFEST}")
    if entries[0].file_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: {MANIFEST} is {entries[0].file_size} bytes (allowed: {MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(_read(path, archive, entries[0]))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: {MANIFEST} must be a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = "update edgeq-runtime" if isinstance(version, int) and version > SCHEMA_VERSION else "recompile the model"
        raise ArtifactError(f"{path}: schema version {version!r}; this runtime reads version {SCHEMA_VERSION} ({hint})")
    for key in ("target", "library", "inputs", "outputs", "members"):
        if key not in manifest:
            raise ArtifactError(f"{path}: {MANIFEST}: missing '{key}'")
    return manifest


def _read(path: Path, archive: zipfile.ZipFile, entry: zipfile.ZipInfo) -> bytes:
    if entry.compress_type != zipfile.ZIP_STORED:
        raise ArtifactError(f"{path}: member {entry.filename} is compressed; edgeq artifacts store members uncompressed")
    try:
        return archive.read(entry)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ArtifactError(f"{path}: member {entry.filename} cannot be read, the file is damaged ({error})") from None


def _members(path: Path, archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo], manifest: dict[str, Any]) -> dict[str, bytes]:
    listed = manifest["members"]
    if not isinstance(listed, dict):
        raise ArtifactError(f"{path}: {MANIFEST}: 'members' must be an object")
    found = {entry.filename: entry for entry in entries[1:]}
    if len(found) != len(entries) - 1:
        raise ArtifactError(f"{path}: a member name appears twice")
    for name in [*listed, *found]:
        if not _SAFE_NAME.match(name) or name == MANIFEST:
            raise ArtifactError(f"{path}: member name {name!r} is not allowed (plain file names only)")
    extra = sorted(set(found) - set(listed))
    missing = sorted(set(listed) - set(found))
    if extra or missing:
        raise ArtifactError(f"{path}: members missing {missing} / not in the manifest {extra}")
    members = {}
    for name, expected in listed.items():
        entry = found[name]
        size = expected.get("size") if isinstance(expected, dict) else None
        if not isinstance(size, int) or size < 0 or size > MAX_MEMBER_BYTES or entry.file_size != size:
            raise ArtifactError(f"{path}: member {name} is {entry.file_size} bytes; the manifest says {size}")
        data = _read(path, archive, entry)
        if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            raise ArtifactError(f"{path}: member {name} fails its sha256 check (the file was modified or damaged)")
        members[name] = data
    return members
