"""Reading a ``.edgeq`` artifact safely: every check happens before any library is loaded.

The artifact is a zip whose members are stored uncompressed: ``manifest.json`` first, then the members the
manifest lists with their size and sha256 (docs/artifact.md). A reader refuses, with a message naming the file:
a missing or truncated file, a manifest that is not valid (:mod:`edgeq_runtime.manifest`: not JSON, of another
schema version, a field of the wrong type or out of range), a member missing, added, compressed, of the wrong size
or with another checksum, a member name that could escape a folder, sizes past the limits below, and a library
that is not a 64-bit ELF library of the manifest's architecture.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq_runtime.manifest import SCHEMA_VERSION, ManifestError, parse_manifest
from edgeq_runtime.names import is_safe_name

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Artifact", "ArtifactError"]

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 64
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
"""ELF ``e_machine`` values, by the manifest's name of the architecture."""


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
        _check_library(path, manifest["library"], members)
        return cls(path, manifest, members)


def _manifest(path: Path, archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo]) -> dict[str, Any]:
    if len(entries) > MAX_MEMBERS:
        raise ArtifactError(f"{path}: {len(entries)} members (allowed: at most {MAX_MEMBERS})")
    if not entries or entries[0].filename != MANIFEST:
        raise ArtifactError(f"{path}: the first member must be {MANIFEST}")
    if entries[0].file_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: {MANIFEST} is {entries[0].file_size} bytes (allowed: {MAX_MANIFEST_BYTES})")
    try:
        return parse_manifest(_read(path, archive, entries[0]))
    except ManifestError as error:
        raise ArtifactError(f"{path}: {MANIFEST}: {error}") from None


def _read(path: Path, archive: zipfile.ZipFile, entry: zipfile.ZipInfo) -> bytes:
    if entry.compress_type != zipfile.ZIP_STORED:
        raise ArtifactError(f"{path}: member {entry.filename} is compressed; edgeq artifacts store members uncompressed")
    try:
        return archive.read(entry)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ArtifactError(f"{path}: member {entry.filename} cannot be read, the file is damaged ({error})") from None


def _members(path: Path, archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo], manifest: dict[str, Any]) -> dict[str, bytes]:
    listed = manifest["members"]
    found = {entry.filename: entry for entry in entries[1:]}
    if len(found) != len(entries) - 1:
        raise ArtifactError(f"{path}: a member name appears twice")
    for name in [*listed, *found]:
        if not is_safe_name(name) or name == MANIFEST:
            raise ArtifactError(f"{path}: member name {name!r} is not allowed (plain file names only)")
    extra = sorted(set(found) - set(listed))
    missing = sorted(set(listed) - set(found))
    if extra or missing:
        raise ArtifactError(f"{path}: members missing {missing} / not in the manifest {extra}")
    members = {}
    for name, expected in listed.items():
        entry = found[name]
        if entry.file_size != expected["size"]:
            raise ArtifactError(f"{path}: member {name} is {entry.file_size} bytes; the manifest says {expected['size']}")
        data = _read(path, archive, entry)
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise ArtifactError(f"{path}: member {name} fails its sha256 check (the file was modified or damaged)")
        members[name] = data
    return members


def _check_library(path: Path, library: dict[str, Any], members: dict[str, bytes]) -> None:
    """The library member is a 64-bit ELF library for the manifest's ``arch``: its magic, its class and its
    ``e_machine``, read before anything loads it (TVM's loader would only say "invalid ELF header")."""
    name, data, arch = library["member"], members[library["member"]], library["arch"]
    if len(data) < 20 or data[:4] != b"\x7fELF" or data[5] not in (1, 2):  # e_ident: magic, class, byte order
        raise ArtifactError(f"{path}: {name} is not an ELF library")
    if data[4] != 2:
        raise ArtifactError(f"{path}: {name} is not a 64-bit ELF library; the manifest says {arch}")
    machine = int.from_bytes(data[18:20], "little" if data[5] == 1 else "big")  # e_machine
    built_for = ELF_MACHINES.get(machine)
    if built_for != arch:
        what = f"an {built_for} library" if built_for else f"a library for ELF machine {machine}"
        raise ArtifactError(f"{path}: {name} is {what}; the manifest says {arch}")
