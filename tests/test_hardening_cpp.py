"""The C++ runtime (edgeq-run) on hostile input (issue 29): a manifest breaking a rule of docs/artifact.md's
"Validation", bytes changed behind the zip CRCs, JSON nested past the limit, a library of another architecture or
needing CPU features this CPU lacks, .npy inputs whose header lies, outputs that would land outside the output folder
or cannot be written. Each is refused with one line naming the file and what is wrong, by the AddressSanitizer build
(a memory error fails the test), never a crash. And one loaded model run from many threads at once gives one
thread's results."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from models import read_only, rewrite_artifact

from edgeq.compile.artifact import LIBRARY

pytestmark = pytest.mark.flow  # builds the C++ runtime (with AddressSanitizer too) and runs it, aarch64 under qemu

SYSROOT = ["-L", "/usr/aarch64-linux-gnu"]
ASAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "PATH": "/usr/bin:/bin"}
X86_64_FEATURES = ("sse4_1", "sse4_2", "ssse3", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe",
                   "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "avx512vbmi", "avx_vnni",
                   "avx512ifma", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "avx512_fp16", "avx512_bf16", "gfni",
                   "vaes", "vpclmulqdq", "sse4a", "fma4", "xop", "tbm")
"""The x86_64 names of docs/artifact.md's "CPU features" table."""


@pytest.fixture(scope="session")
def binaries(cpp_build) -> dict[str, Path]:
    """The C++ runtime's build folders (:func:`conftest.cpp_build`): x86_64, x86_64 with AddressSanitizer, aarch64."""
    return {variant: cpp_build / variant for variant in ("x86_64", "x86_64-asan", "aarch64")}


@pytest.fixture(scope="module")
def subject(functional_ops_artifacts, tmp_path_factory) -> dict[str, Path]:
    """A two-output model compiled for x86_64 and for aarch64 (:func:`conftest.functional_ops_artifacts`), and an
    input file."""
    path = tmp_path_factory.mktemp("hardening_cpp") / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32))
    return {"x86_64": functional_ops_artifacts("x86_64"), "aarch64": functional_ops_artifacts("aarch64"), "input": path}


def run(binary: Path, artifact: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(binary), str(artifact), *args], capture_output=True, text=True, errors="replace",
                          check=False, env=ASAN_ENV, timeout=120)


def assert_refused(completed: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 1 and one line, `edgeq-run: error: ...`, containing `message`; no AddressSanitizer report."""
    assert "AddressSanitizer" not in completed.stderr, completed.stderr[-3000:]
    lines = [line for line in completed.stderr.splitlines() if "TCG doesn't support" not in line]  # qemu's notes
    assert completed.returncode == 1 and len(lines) == 1, completed.stderr[-3000:]
    assert lines[0].startswith("edgeq-run: error: ") and message in lines[0], lines[0]


def refused_by_asan_build(binaries, subject, artifact: Path, message: str, tmp_path: Path, *inputs: Path) -> None:
    completed = run(binaries["x86_64-asan"] / "edgeq-run", artifact, *sum((["--input", str(i)] for i in inputs or [subject["input"]]), []),
                    "--output-dir", str(tmp_path / "out"))
    assert_refused(completed, message)


def replace_member(manifest: dict, members: dict, name: str, data: bytes) -> None:
    """Put `data` in member `name`, listed with its size and sha256 as compile lists it."""
    import hashlib

    members[name] = data
    manifest["members"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---- the manifest's fields: one rule per case ----------------------------------------------------------------------


def _parent(manifest: dict, path: str) -> tuple[dict | list, str | int]:
    """The object or list holding the field at `path` ("inputs/0/quant/scale"), and the field's key or index."""
    *parents, last = path.split("/")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, int(last) if isinstance(node, list) else last


def setter(path: str, value: object) -> Callable[[dict, dict], None]:
    """A change setting the manifest field at `path` to `value`."""

    def change(manifest: dict, members: dict) -> None:
        node, key = _parent(manifest, path)
        node[key] = value

    return change


def deleter(path: str) -> Callable[[dict, dict], None]:
    """A change deleting the manifest field at `path`."""

    def change(manifest: dict, members: dict) -> None:
        node, key = _parent(manifest, path)
        del node[key]

    return change


def _float_input_with_quantizer(manifest: dict, members: dict) -> None:
    manifest["inputs"][0].update(dtype="float32", quant=None, quantizer="quantize_input0")


def _manifest_as_member(manifest: dict, members: dict) -> None:
    manifest["members"]["manifest.json"] = manifest["members"]["check.json"]


def _too_many_outputs(manifest: dict, members: dict) -> None:
    manifest["outputs"] = [dict(manifest["outputs"][0], name=f"o{i}", file=f"o{i}") for i in range(65)]


def _repeated(key: str) -> Callable[[dict, dict], None]:
    def change(manifest: dict, members: dict) -> None:
        manifest["outputs"][1][key] = manifest["outputs"][0][key]

    return change


SCALE = "inputs/0/quant/scale"
MANIFEST_RULES = {
    "newer schema": (setter("schema_version", 4), "schema version 4; this runtime reads versions 2 and 3 (update the edgeq runtime)"),
    "older schema": (setter("schema_version", 1), "schema version 1; this runtime reads versions 2 and 3 (recompile the model)"),
    "schema as a string": (setter("schema_version", "2"), 'manifest.json: schema_version must be an integer >= 1; got "2"'),
    "unknown top-level key": (setter("signature", "x"), "manifest.json: signature is not a known key (known: schema_version,"),
    "unknown target key": (setter("target/vendor", "x"), "manifest.json: target.vendor is not a known key (known: name, kind, host)"),
    "unknown library key": (setter("library/flags", []), "manifest.json: library.flags is not a known key"),
    "unknown tensor key": (setter("inputs/0/layout", "NCHW"), "manifest.json: inputs[0].layout is not a known key"),
    "unknown quant key": (setter("outputs/0/quant/bits", 8), "manifest.json: outputs[0].quant.bits is not a known key"),
    "unknown member key": (setter("members/model.so/mode", 493), 'manifest.json: members["model.so"].mode is not a known key'),
    "missing file": (deleter("inputs/0/file"), "manifest.json: inputs[0].file is missing"),
    "missing cpu_features": (deleter("library/cpu_features"), "manifest.json: library.cpu_features is missing"),
    "version as a number": (setter("edgeq_version", 1), "manifest.json: edgeq_version must be a string; got 1"),
    "source as null": (setter("source", None), "manifest.json: source must be a string; got null"),
    "target kind": (setter("target/kind", "gpu"), 'manifest.json: target.kind must be "cpu" or "npu"; got "gpu"'),
    "target host": (setter("target/host", 3), "manifest.json: target.host must be a string or null; got 3"),
    "npu execution": (setter("npu_execution", "real"), 'manifest.json: npu_execution must be null or "simulated"; got "real"'),
    "opt_level out of range": (setter("opt_level", 3), "manifest.json: opt_level must be an integer from 0 to 2; got 3"),
    "opt_level true": (setter("opt_level", True), "manifest.json: opt_level must be an integer from 0 to 2; got true"),
    "opt_level 1.0": (setter("opt_level", 1.0), "manifest.json: opt_level must be an integer from 0 to 2; got 1"),
    "opt_level '1'": (setter("opt_level", "1"), 'manifest.json: opt_level must be an integer from 0 to 2; got "1"'),
    "tuned_kernels negative": (setter("tuned_kernels", -1), "manifest.json: tuned_kernels must be an integer >= 0; got -1"),
    "placement a list": (setter("placement", []), "manifest.json: placement must be an object; got []"),
    "library member unlisted": (setter("library/member", "other.so"), 'manifest.json: library.member must name one of the members; got "other.so"'),
    "library arch": (setter("library/arch", "riscv64"), 'manifest.json: library.arch must be "x86_64" or "aarch64"; got "riscv64"'),
    "library entry": (setter("library/entry", "start"), 'manifest.json: library.entry must be "main"; got "start"'),
    "library format": (setter("library/format", "onnx"), 'manifest.json: library.format must be "tvm-relax-vm"; got "onnx"'),
    "cpu feature unknown": (setter("library/cpu_features", ["avx9"]), 'manifest.json: library.cpu_features[0] must be "ssse3", "fma",'),
    "cpu feature of another arch": (setter("library/cpu_features", ["asimd"]), 'manifest.json: library.cpu_features[0] must be "ssse3"'),
    "cpu feature twice": (setter("library/cpu_features", ["avx2", "avx2"]), 'manifest.json: library.cpu_features[1] repeats "avx2"'),
    "cpu features not a list": (setter("library/cpu_features", "avx2"), 'manifest.json: library.cpu_features must be a list; got "avx2"'),
    "no inputs": (setter("inputs", []), "manifest.json: inputs must list 1 to 64 tensors; got 0"),
    "65 outputs": (_too_many_outputs, "manifest.json: outputs must list 1 to 64 tensors; got 65"),
    "empty name": (setter("inputs/0/name", ""), 'manifest.json: inputs[0].name must have 1 to 256 characters; got ""'),
    "long name": (setter("inputs/0/name", "é" * 257), "manifest.json: inputs[0].name must have 1 to 256 characters"),
    "repeated name": (_repeated("name"), 'manifest.json: outputs[1].name repeats outputs[0].name ("dequant")'),
    "file escaping": (setter("outputs/0/file", "../escaped"),
                      "manifest.json: outputs[0].file '../escaped' is not allowed (plain file names only: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"),
    "file absolute": (setter("outputs/0/file", "/tmp/escaped"), "manifest.json: outputs[0].file '/tmp/escaped' is not allowed"),
    "file hidden": (setter("outputs/0/file", ".hidden"), "manifest.json: outputs[0].file '.hidden' is not allowed"),
    "file in a folder": (setter("inputs/0/file", "a/b"), "manifest.json: inputs[0].file 'a/b' is not allowed"),
    "file too long": (setter("outputs/0/file", "f" * 129), "manifest.json: outputs[0].file 'fff"),
    "file not a string": (setter("outputs/0/file", 7), "manifest.json: outputs[0].file must be a string; got 7"),
    "repeated file": (_repeated("file"), 'manifest.json: outputs[1].file repeats outputs[0].file ("dequant")'),
    "9 dimensions": (setter("inputs/0/shape", [1] * 9), "manifest.json: inputs[0].shape must have at most 8 dimensions; got 9"),
    "dimension 0": (setter("inputs/0/shape/1", 0), "manifest.json: inputs[0].shape[1] must be an integer from 1 to 2147483647; got 0"),
    "dimension 2^31": (setter("inputs/0/shape/1", 2**31), "manifest.json: inputs[0].shape[1] must be an integer from 1 to 2147483647; got 2147483648"),
    "dimension 3.0": (setter("inputs/0/shape/1", 3.0), "manifest.json: inputs[0].shape[1] must be an integer from 1 to 2147483647; got 3"),
    "tensor over 2^31 bytes": (setter("outputs/0/shape", [65536, 32769]), "manifest.json: outputs[0].shape makes a tensor of more than 2^31 bytes (int8)"),
    "tensor overflowing int64": (setter("outputs/0/shape", [2**31 - 1] * 8), "manifest.json: outputs[0].shape makes a tensor of more than 2^31 bytes"),
    "dtype": (setter("inputs/0/dtype", "float64"), 'manifest.json: inputs[0].dtype must be "int8", "uint8", "int32" or "float32"; got "float64"'),
    "quant of a float tensor": (setter("outputs/0/dtype", "float32"), "manifest.json: outputs[0].quant must be null for a float32 tensor"),
    "scale zero": (setter(SCALE, [0]), "manifest.json: inputs[0].quant.scale[0] must be a finite positive number, also as float32; got 0"),
    "scale negative": (setter(SCALE, [-0.5]), "manifest.json: inputs[0].quant.scale[0] must be a finite positive number"),
    "scale NaN": (setter(SCALE, [float("nan")]), "manifest.json: not valid JSON (NaN and Infinity are not JSON)"),
    "scale infinite": (setter(SCALE, [float("-inf")]), "manifest.json: not valid JSON (NaN and Infinity are not JSON)"),
    "scale 0 as float32": (setter(SCALE, [1e-50]), "manifest.json: inputs[0].quant.scale[0] must be a finite positive number, also as float32"),
    "scale infinite as float32": (setter(SCALE, [1e39]), "manifest.json: inputs[0].quant.scale[0] must be a finite positive number, also as float32"),
    "scale a string": (setter(SCALE, ["0.5"]), 'manifest.json: inputs[0].quant.scale[0] must be a finite positive number, also as float32; got "0.5"'),
    "scale true": (setter(SCALE, [True]), "manifest.json: inputs[0].quant.scale[0] must be a finite positive number, also as float32; got true"),
    "no scale": (setter(SCALE, []), "manifest.json: inputs[0].quant.scale must list at least one scale"),
    "zero points fewer": (setter("inputs/0/quant/zero_point", []),
                          "manifest.json: inputs[0].quant.zero_point must list as many zero points as there are scales (1); got 0"),
    "zero point out of int8": (setter("inputs/0/quant/zero_point", [128]),
                               "manifest.json: inputs[0].quant.zero_point[0] must be an integer from -128 to 127 (int8); got 128"),
    "zero point 0.0": (setter("inputs/0/quant/zero_point", [0.0]),
                       "manifest.json: inputs[0].quant.zero_point[0] must be an integer from -128 to 127 (int8); got 0"),
    "two scales without axis": (lambda m, _: m["inputs"][0]["quant"].update(scale=[0.5] * 2, zero_point=[0] * 2),
                                "manifest.json: inputs[0].quant.scale must list one scale when axis is null; got 2"),
    "axis past the dimensions": (setter("inputs/0/quant/axis", 4),
                                 "manifest.json: inputs[0].quant.axis must be an integer from 0 to 3 (a dimension of the tensor); got 4"),
    "axis negative": (setter("inputs/0/quant/axis", -1),
                      "manifest.json: inputs[0].quant.axis must be an integer from 0 to 3 (a dimension of the tensor); got -1"),
    "scales per channel miscounted": (lambda m, _: m["inputs"][0]["quant"].update(axis=1, scale=[0.5] * 2, zero_point=[0] * 2),
                                      "manifest.json: inputs[0].quant.scale must list 1 or 3 scales (shape[1]); got 2"),
    "quantizer not an identifier": (setter("inputs/0/quantizer", "quantize input"),
                                    'manifest.json: inputs[0].quantizer must be a function name ([A-Za-z_][A-Za-z0-9_]{0,63}); got "quantize input"'),
    "quantizer too long": (setter("inputs/0/quantizer", "q" * 65), "manifest.json: inputs[0].quantizer must be a function name"),
    "quantizer of a float input": (_float_input_with_quantizer, "manifest.json: inputs[0].quantizer is for quantized inputs only (quant is null)"),
    "quantizer of an output": (setter("outputs/0/quantizer", "quantize_input0"),
                               "manifest.json: outputs[0].quantizer is not a known key (known: name, file, shape, dtype, quant)"),
    "member size negative": (setter("members/check.json/size", -1),
                             'manifest.json: members["check.json"].size must be an integer from 0 to 2147483648; got -1'),
    "member size true": (setter("members/check.json/size", True),
                         'manifest.json: members["check.json"].size must be an integer from 0 to 2147483648; got true'),
    "member sha256 upper case": (lambda m, _: m["members"]["check.json"].update(sha256=m["members"]["check.json"]["sha256"].upper()),
                                 'manifest.json: members["check.json"].sha256 must be 64 lowercase hexadecimal digits'),
    "member named manifest.json": (_manifest_as_member, "manifest.json: members: member name 'manifest.json' is not allowed (plain file names only"),
}


@pytest.mark.parametrize("case", list(MANIFEST_RULES))
def test_manifest_rules(case, binaries, subject, tmp_path):
    change, message = MANIFEST_RULES[case]
    bad = rewrite_artifact(subject["x86_64"], tmp_path / "bad.edgeq", change)
    refused_by_asan_build(binaries, subject, bad, f"{bad}: {message}", tmp_path)


# ---- bytes changed behind the checksums, nesting --------------------------------------------------------------------


def edit_bytes(source: Path, target: Path, old: bytes, new: bytes) -> Path:
    """Copy `source` with its one occurrence of `old` replaced by `new` (as long), leaving every CRC as it was."""
    data = source.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    target.write_bytes(data.replace(old, new))
    return target


def test_a_changed_digit_in_the_manifest_fails_its_crc(binaries, subject, tmp_path):
    bad = edit_bytes(subject["x86_64"], tmp_path / "bad.edgeq", b'"opt_level": 2', b'"opt_level": 1')
    refused_by_asan_build(binaries, subject, bad, f"{bad}: manifest.json fails its CRC check (the file was modified or damaged)", tmp_path)


def test_a_changed_library_byte_fails_its_crc(binaries, subject, tmp_path):
    data = bytearray(subject["x86_64"].read_bytes())
    with zipfile.ZipFile(subject["x86_64"]) as archive:
        info = archive.getinfo(LIBRARY)
    data[info.header_offset + 30 + len(LIBRARY) + 1000] ^= 0x01  # a byte of model.so's data
    bad = tmp_path / "bad.edgeq"
    bad.write_bytes(bytes(data))
    refused_by_asan_build(binaries, subject, bad, f"{bad}: member model.so fails its CRC check", tmp_path)


def test_zip_headers_disagreeing_on_a_crc(binaries, subject, tmp_path):
    data = bytearray(subject["x86_64"].read_bytes())
    with zipfile.ZipFile(subject["x86_64"]) as archive:
        info = archive.getinfo("graph.json")
    struct.pack_into("<I", data, info.header_offset + 14, info.CRC ^ 1)  # the local header's CRC-32
    bad = tmp_path / "bad.edgeq"
    bad.write_bytes(bytes(data))
    refused_by_asan_build(binaries, subject, bad, f"{bad}: member graph.json fails its CRC check (its zip headers disagree)", tmp_path)


def write_manifest_text(source: Path, target: Path, text: str) -> Path:
    """Copy `source` with `text` as its manifest (CRCs recomputed by the zip writer)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as out:
        for info in archive.infolist():
            out.writestr(info.filename, text if info.filename == "manifest.json" else archive.read(info))
    return target


@pytest.mark.parametrize("depth", [33, 200_000])
def test_deep_nesting_is_refused_before_parsing(depth, binaries, subject, tmp_path):
    """200,000 nested ``[`` fit in 1 MiB and used to overflow the JSON parser's stack."""
    manifest = json.loads(zipfile.ZipFile(subject["x86_64"]).read("manifest.json"))
    text = json.dumps(manifest)[:-1] + ', "deep": {"a": ' + "[" * (depth - 2) + "]" * (depth - 2) + "}}"
    bad = write_manifest_text(subject["x86_64"], tmp_path / "bad.edgeq", text)
    refused_by_asan_build(binaries, subject, bad, f"{bad}: manifest.json: nested more than 32 deep", tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"schema_version": 2, "opt_level": 1, "opt_level": 2}', "manifest.json: not valid JSON (a key appears twice in one object)"),
        ('{"schema_version": 2, "source": "a:b", "target": {"name": "x", "name": "y"}}', "manifest.json: not valid JSON (a key appears twice in one object)"),
        ("[2]", "manifest.json: not a JSON object"),
        ('{"schema_version": 2,', "manifest.json: not valid JSON ("),
    ],
    ids=["key twice", "key twice, nested", "a list", "cut short"],
)
def test_manifests_that_are_not_json_objects(text, message, binaries, subject, tmp_path):
    """A key given twice would leave the two runtimes to disagree on which value counts: refused, as NaN is."""
    bad = write_manifest_text(subject["x86_64"], tmp_path / "bad.edgeq", text)
    refused_by_asan_build(binaries, subject, bad, f"{bad}: {message}", tmp_path)


def test_nesting_of_32_and_brackets_in_strings_pass_the_depth_check(binaries, subject, tmp_path):
    manifest = json.loads(zipfile.ZipFile(subject["x86_64"]).read("manifest.json"))
    text = json.dumps(manifest)[:-1] + ', "deep": {"a": ' + "[" * 30 + "]" * 30 + "}}"  # 32 levels
    deep = write_manifest_text(subject["x86_64"], tmp_path / "deep.edgeq", text)
    refused_by_asan_build(binaries, subject, deep, f"{deep}: manifest.json: deep is not a known key", tmp_path)
    source = '[{"\\' + "[" * 100  # brackets inside a string, after an escaped quote: no nesting
    fine = rewrite_artifact(subject["x86_64"], tmp_path / "fine.edgeq", setter("source", source))
    completed = run(binaries["x86_64-asan"] / "edgeq-run", fine, "--input", str(subject["input"]), "--output-dir", str(tmp_path / "out"))
    assert completed.returncode == 0, completed.stderr[-3000:]


# ---- the library: architecture and CPU features ------------------------------------------------------------------


def library_of(artifact: Path) -> bytes:
    with zipfile.ZipFile(artifact) as archive:
        return archive.read(LIBRARY)


def test_a_library_of_another_architecture_is_refused_by_its_elf_header(binaries, subject, tmp_path):
    arm_library = library_of(subject["aarch64"])
    bad = rewrite_artifact(subject["x86_64"], tmp_path / "bad.edgeq", lambda m, members: replace_member(m, members, LIBRARY, arm_library))
    refused_by_asan_build(binaries, subject, bad, f"{bad}: model.so is an aarch64 library; this machine is x86_64", tmp_path)


def test_aarch64_runtime_refuses_an_x86_64_library(binaries, subject, tmp_path):
    x86_library = library_of(subject["x86_64"])
    bad = rewrite_artifact(subject["aarch64"], tmp_path / "bad.edgeq", lambda m, members: replace_member(m, members, LIBRARY, x86_library))
    completed = run(binaries["aarch64"] / "edgeq-run", bad, "--output-dir", str(tmp_path), prefix=("qemu-aarch64", *SYSROOT))
    assert_refused(completed, f"{bad}: model.so is an x86_64 library; this machine is aarch64")


@pytest.mark.parametrize("library", [b"#!/bin/sh\necho not a library\n" * 4, b"\x7fELF\x01\x01" + bytes(58)], ids=["script", "32-bit ELF"])
def test_a_library_that_is_no_64_bit_elf_is_refused(library, binaries, subject, tmp_path):
    bad = rewrite_artifact(subject["x86_64"], tmp_path / "bad.edgeq", lambda m, members: replace_member(m, members, LIBRARY, library))
    refused_by_asan_build(binaries, subject, bad, f"{bad}: model.so is not a 64-bit little-endian ELF library", tmp_path)


def with_cpu_features(source: Path, target: Path, features: list[str]) -> Path:
    return rewrite_artifact(source, target, setter("library/cpu_features", features))


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_a_feature_this_cpu_lacks_is_refused(binaries, subject, tmp_path):
    missing = [name for name in X86_64_FEATURES if name not in cpu_flags()]
    if not missing:
        pytest.skip("this CPU has every x86_64 feature of the table (the qemu tests below cover the refusal)")
    bad = with_cpu_features(subject["x86_64"], tmp_path / "bad.edgeq", ["avx2", missing[-1]])
    refused_by_asan_build(binaries, subject, bad, f"{bad}: built for a CPU with {missing[-1]}; this CPU lacks it", tmp_path)


@pytest.mark.parametrize(
    "cpu, features, message",
    [
        ("Haswell", ["avx2", "fma", "avx512_vnni"],
         "built for a CPU with avx512_vnni; this CPU lacks it: recompile for target x86_64 (the x86-64-v3 baseline)"),
        ("max", ["avx2", "avx512f", "avx_vnni"], "built for a CPU with avx512f, avx_vnni; this CPU lacks them: recompile for target x86_64"),
        ("qemu64", ["avx2"], "built for a CPU with avx2; this CPU lacks it: edgeq's x86_64 target needs it too (x86-64-v3): "
                             "recompile for a target of your own without it (docs/targets.md)"),
    ],
)
def test_x86_64_features_by_cpuid_under_qemu(cpu, features, message, binaries, subject, tmp_path):
    """Emulated CPUs lacking features (by CPUID; qemu 7's TCG has no AVX-512 at all): refused before loading."""
    bad = with_cpu_features(subject["x86_64"], tmp_path / "bad.edgeq", features)
    completed = run(binaries["x86_64"] / "edgeq-run", bad, "--output-dir", str(tmp_path), prefix=("qemu-x86_64", "-cpu", cpu))
    assert_refused(completed, f"{bad}: {message}")


def test_aarch64_features_by_auxv_under_qemu(binaries, subject, tmp_path):
    """A Cortex-A53 has NEON but neither the dot product nor i8mm (getauxval(AT_HWCAP / AT_HWCAP2)); qemu's default
    CPU has all three, and runs the model."""
    artifact = with_cpu_features(subject["aarch64"], tmp_path / "dotprod.edgeq", ["asimd", "asimddp", "i8mm"])
    a53 = ("qemu-aarch64", "-cpu", "cortex-a53", *SYSROOT)
    completed = run(binaries["aarch64"] / "edgeq-run", artifact, "--output-dir", str(tmp_path), prefix=a53)
    assert_refused(completed, f"{artifact}: built for a CPU with asimddp, i8mm; this CPU lacks them: recompile for target aarch64 (the ARMv8-A NEON baseline)")
    completed = run(binaries["aarch64"] / "edgeq-run", artifact, "--input", str(subject["input"]), "--output-dir", str(tmp_path / "out"),
                    prefix=("qemu-aarch64", *SYSROOT))
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dequant.npy", "dequant_map.npy"]


# ---- inputs: .npy headers checked before anything is allocated ------------------------------------------------------


def npy_bytes(descr: str, shape: str, data: bytes, version: int = 1, header_length: int | None = None) -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    length = len(header) if header_length is None else header_length
    size = struct.pack("<H", length) if version == 1 else struct.pack("<I", length)
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + data


GOOD_DATA = np.zeros((2, 3, 8, 8), np.float32).tobytes()
NPY_LIES = {
    "data shorter than the shape": (npy_bytes("<f4", "(2, 3, 8, 8)", GOOD_DATA[:-4]), "holds 1532 data bytes; its shape needs 1536"),
    "data longer than the shape": (npy_bytes("<f4", "(2, 3, 8, 8)", GOOD_DATA + b"xx"), "holds 1538 data bytes; its shape needs 1536"),
    "shape past 2^64 bytes": (npy_bytes("<f4", "(4294967296, 4294967296, 2)", GOOD_DATA), "the shape in its .npy header makes more than 2^64 bytes"),
    "shape past int64": (npy_bytes("<f4", "(99999999999999999999,)", GOOD_DATA), "bad shape in the .npy header ('99999999999999999999')"),
    "negative dimension": (npy_bytes("<f4", "(-2, 3, 8, 8)", GOOD_DATA), "bad shape in the .npy header ('-2')"),
    "dimension not a number": (npy_bytes("<f4", "(2, 3e0, 8, 8)", GOOD_DATA), "bad shape in the .npy header ('3e0')"),
    "header length past the file": (npy_bytes("<f4", "(2, 3, 8, 8)", b"", header_length=60000), "truncated .npy header"),
    "header of 100 kB": (npy_bytes("<f4", "(2, 3, 8, 8)", GOOD_DATA, version=2, header_length=100_000), ".npy header of 100000 bytes (allowed: at most 65536)"),
    "float64": (npy_bytes("<f8", "(2, 3, 8, 8)", GOOD_DATA * 2), "dtype '<f8' is not supported"),
    "other shape": (npy_bytes("<f4", "(1, 3, 8, 8)", GOOD_DATA[:768]), "input 'x' has shape [1, 3, 8, 8]; expected [2, 3, 8, 8]"),
    "other dtype": (npy_bytes("<i4", "(2, 3, 8, 8)", GOOD_DATA), "input 'x' has dtype int32; expected int8 (raw) or float32 to quantize"),
    "not a .npy file": (b"P6\n8 8\n255\n" + bytes(192), "not a .npy file"),
    "a key misspelt": (npy_bytes("<f4", "(2, 3, 8, 8)", GOOD_DATA).replace(b"fortran_order", b"fortran_o\x85der"), "bad .npy header: unknown key 'fortran_o"),
    "a key missing": (npy_bytes("<f4", "(2, 3, 8, 8)", GOOD_DATA).replace(b"'fortran_order': False, ", b" " * 24),
                      "bad .npy header: it needs 'descr', 'fortran_order' and 'shape'"),
    "a quote lost": (npy_bytes("<f4", "(2, 3, 8, 8)", GOOD_DATA).replace(b"'fortran_order'", b"8fortran_order'"), "bad .npy header: expected a quoted string"),
    "one dimension without its comma": (npy_bytes("<f4", "(384)", GOOD_DATA), "bad .npy header: a shape of one dimension is written (n,)"),
    "Fortran order": (npy_bytes("<f4", "(2, 3, 8, 8)", GOOD_DATA).replace(b"False", b"True "), "Fortran-order arrays are not supported"),
}


@pytest.mark.parametrize("case", list(NPY_LIES))
def test_npy_headers_that_lie(case, binaries, subject, tmp_path):
    data, message = NPY_LIES[case]
    path = tmp_path / "lying.npy"
    path.write_bytes(data)
    refused_by_asan_build(binaries, subject, subject["x86_64"], f"{path}: {message}", tmp_path, path)


def test_more_inputs_than_the_model_takes(binaries, subject, tmp_path):
    refused_by_asan_build(binaries, subject, subject["x86_64"], "2 input(s) given; the model takes 1", tmp_path, subject["input"], subject["input"])


# ---- outputs: inside the output folder, written whole ------------------------------------------------------------


def run_into(binaries, subject, artifact: Path, out: Path) -> subprocess.CompletedProcess:
    return run(binaries["x86_64-asan"] / "edgeq-run", artifact, "--input", str(subject["input"]), "--output-dir", str(out))


def test_outputs_are_written_under_their_file_names(binaries, subject, tmp_path):
    renamed = rewrite_artifact(subject["x86_64"], tmp_path / "renamed.edgeq", setter("outputs/1/file", "feature_map.v2"))
    completed = run_into(binaries, subject, renamed, tmp_path / "out")
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dequant.npy", "feature_map.v2.npy"]


def test_an_output_link_pointing_outside_the_folder_is_refused(binaries, subject, tmp_path):
    outside = tmp_path / "elsewhere" / "precious.npy"
    outside.parent.mkdir()
    outside.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dequant_map.npy").symlink_to(outside)
    completed = run_into(binaries, subject, subject["x86_64"], out)
    assert_refused(completed, f"{out / 'dequant_map.npy'}: resolves to {outside}, outside the output folder {out}; not written")
    assert outside.read_bytes() == b"keep me"
    assert [p.name for p in out.iterdir()] == ["dequant_map.npy"]  # checked before the model ran: no output written


def test_a_dangling_link_is_replaced_not_followed(binaries, subject, tmp_path):
    """A link to a file not yet there resolves inside the folder (weakly_canonical); the output replaces the link and
    nothing is created where it pointed."""
    target = tmp_path / "elsewhere" / "created.npy"
    out = tmp_path / "out"
    out.mkdir()
    (out / "dequant.npy").symlink_to(target)
    completed = run_into(binaries, subject, subject["x86_64"], out)
    assert completed.returncode == 0, completed.stderr
    assert not (out / "dequant.npy").is_symlink() and np.load(out / "dequant.npy").shape == (2, 4)
    assert not target.parent.exists()


def test_a_folder_where_an_output_goes(binaries, subject, tmp_path):
    out = tmp_path / "out"
    (out / "dequant.npy").mkdir(parents=True)
    completed = run_into(binaries, subject, subject["x86_64"], out)
    assert_refused(completed, f"{out / 'dequant.npy'}: cannot be written: Is a directory")
    assert sorted(p.name for p in out.iterdir()) == ["dequant.npy"]  # no temporary file left behind


def test_a_read_only_output_folder(binaries, subject, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        completed = run_into(binaries, subject, subject["x86_64"], out)
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert_refused(completed, f"{out / 'dequant.npy'}: cannot be written: {reason}")
    assert list(out.iterdir()) == []


# ---- one model, many threads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["x86_64", "x86_64-asan"])
def test_one_model_run_from_4_threads_equals_one_thread(variant, binaries, subject):
    """4 threads x 200 calls on one loaded Model: each overlapping call gets a VM of its own; every result equals the
    single-threaded one."""
    completed = subprocess.run([str(binaries[variant] / "edgeq-run-concurrency"), str(subject["x86_64"]), str(subject["input"]), "4", "200"],
                               capture_output=True, text=True, check=False, env=ASAN_ENV, timeout=600)
    assert completed.returncode == 0 and "AddressSanitizer" not in completed.stderr, completed.stderr[-3000:]
    assert completed.stdout.strip() == "4 threads x 200 calls: all equal (800 runs)"


# ---- every feature LLVM may use, AMD's too ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zen3(functional_ops_artifacts) -> Path:
    """A tiny model compiled for a target of the user's own for AMD Zen 3 (targets/x86_64.toml with LLVM mcpu znver3,
    which uses SSE4a, VAES and VPCLMULQDQ besides x86-64-v3's features; :func:`conftest.functional_ops_artifacts`)."""
    return functional_ops_artifacts("zen3")


def features_of(artifact: Path) -> list[str]:
    with zipfile.ZipFile(artifact) as archive:
        return json.loads(archive.read("manifest.json"))["library"]["cpu_features"]


def lacking(names: list[str]) -> str:
    return f"built for a CPU with {', '.join(names)}; this CPU lacks {'it' if len(names) == 1 else 'them'}"


def test_an_amd_build_is_refused_naming_sse4a_on_a_cpu_without_it(binaries, subject, zen3, tmp_path):
    features = features_of(zen3)
    assert "sse4a" in features
    if "sse4a" in cpu_flags():
        pytest.skip("this CPU has SSE4a (an AMD one)")
    missing = [name for name in features if name not in cpu_flags()]
    refused_by_asan_build(binaries, subject, zen3, f"{zen3}: {lacking(missing)}: recompile for target x86_64 (the x86-64-v3 baseline)", tmp_path)


@pytest.mark.parametrize(
    "cpu, missing",
    [
        ("Haswell", ["sse4a", "vaes", "vpclmulqdq"]),  # Intel: LZCNT (abm) and MOVBE, no SSE4a
        ("EPYC", ["vaes", "vpclmulqdq"]),  # Zen 1: SSE4a, CPUID 0x80000001
        ("max", ["vpclmulqdq"]),  # qemu's TCG: VAES but no VPCLMULQDQ
    ],
)
def test_an_amd_build_under_qemu(cpu, missing, binaries, zen3, tmp_path):
    completed = run(binaries["x86_64"] / "edgeq-run", zen3, "--output-dir", str(tmp_path), prefix=("qemu-x86_64", "-cpu", cpu))
    assert_refused(completed, f"{zen3}: {lacking(missing)}: recompile for target x86_64 (the x86-64-v3 baseline)")


@pytest.mark.parametrize(
    "cpu, missing",
    [
        ("Haswell", ["sse4a", "fma4", "xop", "tbm", "gfni"]),
        ("EPYC", ["fma4", "xop", "tbm", "gfni"]),  # (qemu's TCG has no XOP, FMA4 or TBM)
        ("Opteron_G4", ["fma4", "xop", "tbm", "movbe", "gfni"]),  # Bulldozer without MOVBE
        ("Denverton", ["sse4a", "fma4", "xop", "tbm", "abm", "gfni"]),  # Goldmont: MOVBE, no LZCNT
    ],
)
def test_new_x86_64_features_by_cpuid_under_qemu(cpu, missing, binaries, subject, tmp_path):
    """The CPUID bits of the features added for AMD CPUs and LLVM's bit manipulation (leaf 1 and 0x80000001)."""
    bad = with_cpu_features(subject["x86_64"], tmp_path / "bad.edgeq", ["sse4a", "fma4", "xop", "tbm", "abm", "movbe", "gfni"])
    completed = run(binaries["x86_64"] / "edgeq-run", bad, "--output-dir", str(tmp_path), prefix=("qemu-x86_64", "-cpu", cpu))
    assert_refused(completed, f"{bad}: {lacking(missing)}")


def test_cpuid_agrees_with_cpuinfo_on_every_x86_64_feature(binaries, subject, tmp_path):
    """On this CPU, edgeq-run finds missing exactly the names of the table /proc/cpuinfo lacks (or runs the model)."""
    artifact = with_cpu_features(subject["x86_64"], tmp_path / "all.edgeq", list(X86_64_FEATURES))
    missing = [name for name in X86_64_FEATURES if name not in cpu_flags()]
    completed = run(binaries["x86_64-asan"] / "edgeq-run", artifact, "--input", str(subject["input"]), "--output-dir", str(tmp_path / "out"))
    if missing:
        assert_refused(completed, f"{artifact}: {lacking(missing)}")
    else:
        assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.parametrize(
    "cpu, missing",
    [
        ("cortex-a53", ["asimddp", "i8mm", "fphp", "sve", "sve2", "bf16"]),
        ("neoverse-n1", ["i8mm", "sve", "sve2", "bf16"]),  # half floats and the dot product (HWCAP bits 9, 20)
        ("a64fx", ["asimddp", "i8mm", "sve2", "bf16"]),  # SVE (HWCAP bit 22)
        ("max", []),  # SVE2, BF16 (HWCAP2 bits 1, 14): runs the model
    ],
)
def test_new_aarch64_features_by_auxv_under_qemu(cpu, missing, binaries, subject, tmp_path):
    artifact = with_cpu_features(subject["aarch64"], tmp_path / "arm.edgeq", ["asimd", "asimddp", "i8mm", "fphp", "sve", "sve2", "bf16"])
    completed = run(binaries["aarch64"] / "edgeq-run", artifact, "--input", str(subject["input"]), "--output-dir", str(tmp_path / "out"),
                    prefix=("qemu-aarch64", "-cpu", cpu, *SYSROOT))
    if missing:
        assert_refused(completed, f"{artifact}: {lacking(missing)}")
    else:
        assert completed.returncode == 0, completed.stderr[-3000:]
