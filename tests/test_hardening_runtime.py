"""Hardening of the Python runtime and ``edgeq run`` (issue 29): every bad manifest refused in one line naming its
field, a library of another architecture or for CPU features this CPU lacks refused by name, one model shared by
threads, .npy headers checked before their data, outputs written only inside the output folder."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from models import read_only, rewrite_artifact

from edgeq.cli import main
from edgeq_runtime import SCHEMA_VERSION, ArtifactError, Model, cpu
from edgeq_runtime.manifest import SCHEMA, SCHEMA_VERSIONS, field

pytestmark = pytest.mark.flow  # runs artifacts through both runtimes

SHAPE = (2, 3, 8, 8)
X86_FEATURES = SCHEMA["properties"]["library"]["allOf"][0]["then"]["properties"]["cpu_features"]["items"]["enum"]


@pytest.fixture(scope="module")
def artifacts(functional_ops_artifacts) -> dict[str, Path]:
    """One two-output model compiled for x86_64 and for aarch64 (:func:`conftest.functional_ops_artifacts`)."""
    return {arch: functional_ops_artifacts(arch) for arch in ("x86_64", "aarch64")}


@pytest.fixture(scope="module")
def x_npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
    return path


def refusal(artifact: Path) -> str:
    """The one-line message ``Model.load(artifact)`` refuses it with."""
    with pytest.raises(ArtifactError) as error:
        Model.load(artifact)
    message = str(error.value)
    assert "\n" not in message
    return message


def set_member(manifest: dict, members: dict, name: str, data: bytes) -> None:
    """Replace member ``name`` and its size and sha256 in the manifest."""
    members[name] = data
    manifest["members"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def with_manifest_text(source: Path, target: Path, edit: Callable[[str], str]) -> Path:
    """``source`` with its manifest's text replaced by ``edit(text)``: for what ``rewrite_artifact`` cannot write (a key
    twice, ``NaN`` inside valid text, no JSON object)."""
    with zipfile.ZipFile(source) as archive:
        text = archive.read("manifest.json").decode()
        members = {i.filename: archive.read(i) for i in archive.infolist() if i.filename != "manifest.json"}
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.json", edit(text))
        for name, data in members.items():
            archive.writestr(name, data)
    return target


# ---- the manifest: one line naming the field ----------------------------------------------------------------------


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _parent(manifest: dict, path: tuple) -> dict | list:
    for key in path[:-1]:
        manifest = manifest[key]
    return manifest


def _set(*path: str | int, to: object) -> Callable[[dict, dict], None]:
    """A change setting the manifest's field at ``path`` to ``to``."""
    return lambda manifest, members: _parent(manifest, path).__setitem__(path[-1], to)


def _delete(*path: str | int) -> Callable[[dict, dict], None]:
    return lambda manifest, members: _parent(manifest, path).__delitem__(path[-1])


TENSOR_FIELDS = "name, file, shape, dtype, quant"
SAFE_NAME_RULE = "(plain file names only: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127})"
BAD_MANIFESTS = {
    "missing shape": (_delete("inputs", 0, "shape"), "inputs[0].shape is missing"),
    "missing inputs": (_delete("inputs"), "inputs is missing"),
    "inputs not a list": (_set("inputs", to={}), "inputs must be a list of 1 to 64 tensors; got {}"),
    "no outputs": (_set("outputs", to=[]), "outputs must be a list of 1 to 64 tensors; got []"),
    "target not an object": (_set("target", to="cpu"), 'target must be an object; got "cpu"'),
    "target kind": (_set("target", "kind", to="gpu"), 'target.kind must be "cpu" or "npu"; got "gpu"'),
    "npu execution": (_set("npu_execution", to="real"), 'npu_execution must be null or "simulated"; got "real"'),
    "dtype a number": (_set("inputs", 0, "dtype", to=8), 'inputs[0].dtype must be "int8", "uint8", "int32" or "float32"; got 8'),
    "output dtype": (_set("outputs", 1, "dtype", to="float64"), 'outputs[1].dtype must be "int8", "uint8", "int32" or "float32"; got "float64"'),
    "float output quantized": (_set("outputs", 0, "dtype", to="float32"), "outputs[0].quant must be null for a float32 tensor"),
    "no scales": (_set("inputs", 0, "quant", "scale", to=[]), "inputs[0].quant.scale must be a list of 1 or more scales; got []"),
    "zero scale": (_set("inputs", 0, "quant", "scale", to=[0.0]), "inputs[0].quant.scale[0] must be a finite positive number, also as float32; got 0.0"),
    "scale a string": (_set("inputs", 0, "quant", "scale", to=["0.5"]),
                       'inputs[0].quant.scale[0] must be a finite positive number, also as float32; got "0.5"'),
    "scale zero as float32": (_set("inputs", 0, "quant", "scale", to=[1e-50]),
                              "inputs[0].quant.scale[0] must be a finite positive number, also as float32; got 1e-50"),
    "scale infinite as float32": (_set("inputs", 0, "quant", "scale", to=[1e39]),
                                  "inputs[0].quant.scale[0] must be a finite positive number, also as float32; got 1e+39"),
    "scale past the float range": (_set("inputs", 0, "quant", "scale", to=[10**400]),
                                   "inputs[0].quant.scale[0] must be a finite positive number, also as float32; got 1000"),
    "zero point out of int8": (_set("inputs", 0, "quant", "zero_point", to=[128]),
                               "inputs[0].quant.zero_point[0] must be an integer from -128 to 127 (int8); got 128"),
    "zero points not one per scale": (_set("inputs", 0, "quant", "zero_point", to=[0, 0]),
                                      "inputs[0].quant.zero_point must list as many zero points as there are scales (1); got 2"),
    "axis past the shape": (_set("inputs", 0, "quant", "axis", to=4), "inputs[0].quant.axis must be an integer from 0 to 3 (a dimension of the tensor); got 4"),
    "negative axis": (_set("inputs", 0, "quant", "axis", to=-1), "inputs[0].quant.axis must be an integer from 0 to 3 (a dimension of the tensor); got -1"),
    "axis a string": (_set("inputs", 0, "quant", "axis", to="0"), 'inputs[0].quant.axis must be null or an integer; got "0"'),
    "scales without an axis": (_set("outputs", 0, "quant", to={"scale": [0.5, 0.5], "zero_point": [0, 0], "axis": None}),
                               "outputs[0].quant.scale must list one scale when axis is null; got 2"),
    "scales not one per index": (_set("outputs", 0, "quant", to={"scale": [0.5, 0.5, 0.5], "zero_point": [0, 0, 0], "axis": 1}),
                                 "outputs[0].quant.scale must list 1 or 4 scales (shape[1]); got 3"),
    "huge dimensions": (_set("inputs", 0, "shape", to=[2**40, 2**40]), "inputs[0].shape[0] must be an integer from 1 to 2147483647; got 1099511627776"),
    "zero dimension": (_set("inputs", 0, "shape", to=[0]), "inputs[0].shape[0] must be an integer from 1 to 2147483647; got 0"),
    "over 2^31 bytes": (_set("inputs", 0, "shape", to=[2**31 - 1, 2]), "inputs[0].shape makes a tensor of more than 2^31 bytes (int8)"),
    "nine dimensions": (_set("inputs", 0, "shape", to=[1] * 9), "inputs[0].shape must be a list of at most 8 dimensions; got [1, 1, 1, 1, 1, 1, 1, 1, 1]"),
    "bool integer": (_set("opt_level", to=True), "opt_level must be an integer from 0 to 2; got true"),
    "float integer": (_set("tuned_kernels", to=1.0), "tuned_kernels must be an integer >= 0; got 1.0"),
    "string integer": (_set("inputs", 0, "shape", 0, to="2"), 'inputs[0].shape[0] must be an integer from 1 to 2147483647; got "2"'),
    "bool zero point": (_set("inputs", 0, "quant", "zero_point", to=[False]), "inputs[0].quant.zero_point[0] must be an integer; got false"),
    "float schema version": (_set("schema_version", to=2.0), "schema_version must be an integer; got 2.0"),
    "member size a string": (_set("members", "graph.json", "size", to="1"), 'members["graph.json"].size must be an integer from 0 to 2147483648; got "1"'),
    "unknown key": (_set("extra", to=1), "extra is not a known key (known: schema_version, edgeq_version, tvm_version, target, library, "
                                         "npu_execution, opt_level, tuned_kernels, source, inputs, outputs, placement, members, npu_command_streams)"),
    "unknown tensor key": (_set("inputs", 0, "scale", to=1.0), f"inputs[0].scale is not a known key (known: {TENSOR_FIELDS}, quantizer)"),
    "output quantizer": (_set("outputs", 0, "quantizer", to="quantize_input0"), f"outputs[0].quantizer is not a known key (known: {TENSOR_FIELDS})"),
    "quantizer of a float input": (_set("inputs", 0, "quant", to=None), "inputs[0].quantizer is for quantized inputs only (quant is null)"),
    "quantizer name": (_set("inputs", 0, "quantizer", to="quantize input"),
                       'inputs[0].quantizer must be a function name ([A-Za-z_][A-Za-z0-9_]{0,63}); got "quantize input"'),
    "quantizer too long": (_set("inputs", 0, "quantizer", to="q" * 65), 'inputs[0].quantizer must be a function name ([A-Za-z_][A-Za-z0-9_]{0,63}); got "qqqq'),
    "escaping file": (_set("outputs", 0, "file", to="../../pwned"), f"outputs[0].file '../../pwned' is not allowed {SAFE_NAME_RULE}"),
    "absolute file": (_set("outputs", 0, "file", to="/tmp/pwned"), f"outputs[0].file '/tmp/pwned' is not allowed {SAFE_NAME_RULE}"),
    "hidden file": (_set("inputs", 0, "file", to=".x"), f"inputs[0].file '.x' is not allowed {SAFE_NAME_RULE}"),
    "file twice": (_set("outputs", 1, "file", to="dequant"), 'outputs[1].file repeats outputs[0].file ("dequant")'),
    "name twice": (_set("outputs", 1, "name", to="dequant"), 'outputs[1].name repeats outputs[0].name ("dequant")'),
    "empty name": (_set("inputs", 0, "name", to=""), 'inputs[0].name must be a string of 1 to 256 characters; got ""'),
    "unknown CPU feature": (_set("library", "cpu_features", to=["avx9"]),
                            "library.cpu_features[0] must be " + ", ".join(f'"{name}"' for name in X86_FEATURES[:-1])
                            + f' or "{X86_FEATURES[-1]}"; got "avx9"'),
    "aarch64 feature on x86_64": (_set("library", "cpu_features", to=["asimd"]), 'library.cpu_features[0] must be "sse4_1", '),
    "CPU feature twice": (_set("library", "cpu_features", to=["avx2", "avx2"]), 'library.cpu_features[1] repeats library.cpu_features[0] ("avx2")'),
    "library member not a member": (_set("library", "member", to="other.so"), 'library.member must name one of the members; got "other.so"'),
    "library format": (_set("library", "format", to="onnx"), 'library.format must be "tvm-relax-vm"; got "onnx"'),
    "library arch": (_set("library", "arch", to="riscv64"), 'library.arch must be "x86_64" or "aarch64"; got "riscv64"'),
    "older schema": (_set("schema_version", to=1), "schema version 1; this runtime reads versions 2 and 3 (recompile the model)"),
    "deep nesting": (_set("placement", to=_nested(40)), "nested more than 32 deep"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_refused_naming_the_field(case, artifacts, tmp_path):
    change, expected = BAD_MANIFESTS[case]
    bad = rewrite_artifact(artifacts["x86_64"], tmp_path / "bad.edgeq", change)
    assert refusal(bad).startswith(f"{bad}: manifest.json: {expected}")


TEXT_EDITS = {
    "NaN": (lambda text: re.sub(r'"scale": \[[^\]]*\]', '"scale": [NaN]', text, count=1), "not valid JSON (NaN is not JSON)"),
    "key twice": (lambda text: text.replace('"opt_level": 2', '"opt_level": 2, "opt_level": 1'),
                  'not valid JSON (key "opt_level" appears twice in one object)'),
    "not an object": (lambda text: "[]", "not a JSON object"),
    "200000 deep": (lambda text: "[" * 200_000 + "]" * 200_000, "nested more than 32 deep"),
}


@pytest.mark.parametrize("case", sorted(TEXT_EDITS))
def test_manifest_text_that_is_not_plain_json_is_refused(case, artifacts, tmp_path):
    edit, expected = TEXT_EDITS[case]
    bad = with_manifest_text(artifacts["x86_64"], tmp_path / "bad.edgeq", edit)
    assert refusal(bad) == f"{bad}: manifest.json: {expected}"


def test_the_runtime_reads_the_schema_version_compile_writes(artifacts):
    """Version 2 without NPU command streams (runtimes of version 2 read it); 3 is the newest read, an Ethos-U
    build's (tests/test_ethos_u_compile.py)."""
    with zipfile.ZipFile(artifacts["x86_64"]) as archive:
        assert json.loads(archive.read("manifest.json"))["schema_version"] == min(SCHEMA_VERSIONS) == 2
    assert SCHEMA_VERSION == 3


def test_field_paths():
    assert field(["inputs", 0, "quant", "scale", 3]) == "inputs[0].quant.scale[3]"
    assert field(["members", "model.so", "size"]) == 'members["model.so"].size'


# ---- the library: its ELF header against the manifest ----------------------------------------------------------


def _library_of(artifact: Path) -> bytes:
    with zipfile.ZipFile(artifact) as archive:
        return archive.read("model.so")


def test_a_library_of_another_architecture_is_refused_by_name(artifacts, tmp_path):
    arm_library = _library_of(artifacts["aarch64"])
    bad = rewrite_artifact(artifacts["x86_64"], tmp_path / "bad.edgeq", lambda m, s: set_member(m, s, "model.so", arm_library))
    assert refusal(bad) == f"{bad}: model.so is an aarch64 library; the manifest says x86_64"


def test_an_x86_64_library_in_an_aarch64_manifest_is_refused_before_running_anything(artifacts, tmp_path, capsys):
    def claim_aarch64(manifest: dict, members: dict) -> None:
        manifest["library"].update(arch="aarch64", cpu_features=["asimd"])

    bad = rewrite_artifact(artifacts["x86_64"], tmp_path / "bad.edgeq", claim_aarch64)
    assert refusal(bad) == f"{bad}: model.so is an x86_64 library; the manifest says aarch64"
    assert main(["run", str(bad), "--output-dir", str(tmp_path / "out")]) == 1  # not handed to qemu
    assert f"{bad}: model.so is an x86_64 library; the manifest says aarch64" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda library: b"not a library", "model.so is not an ELF library"),
        (lambda library: library[:10], "model.so is not an ELF library"),
        (lambda library: library[:4] + b"\x01" + library[5:], "model.so is not a 64-bit ELF library; the manifest says x86_64"),
        (lambda library: library[:18] + (40).to_bytes(2, "little") + library[20:], "model.so is a library for ELF machine 40; the manifest says x86_64"),
    ],
    ids=["text", "truncated", "32-bit", "arm32"],
)
def test_a_library_that_is_not_a_64_bit_elf_library_is_refused(artifacts, tmp_path, spoil, expected):
    library = spoil(_library_of(artifacts["x86_64"]))
    bad = rewrite_artifact(artifacts["x86_64"], tmp_path / "bad.edgeq", lambda m, s: set_member(m, s, "model.so", library))
    assert refusal(bad) == f"{bad}: {expected}"


# ---- CPU features ----------------------------------------------------------------------------------------------


def _needing(artifact: Path, target: Path, features: list[str]) -> Path:
    return rewrite_artifact(artifact, target, lambda manifest, members: manifest["library"].update(cpu_features=features))


def test_a_cpu_feature_this_cpu_lacks_is_refused_by_name(artifacts, tmp_path):
    present = cpu.cpu_features()
    lacking = [name for name in X86_FEATURES if present is not None and name not in present]
    if not lacking:
        pytest.skip("this CPU has every x86_64 feature of docs/artifact.md (or its features cannot be read)")
    bad = _needing(artifacts["x86_64"], tmp_path / "bad.edgeq", ["avx2", lacking[0]])
    assert refusal(bad) == (
        f"{bad}: built for a CPU with {lacking[0]}, which this CPU lacks: recompile for target x86_64 (the x86-64-v3 "
        "baseline) or on this machine"
    )


def test_cpu_features_are_read_from_cpuinfo(artifacts, tmp_path, monkeypatch):
    """A CPU without AVX-512 VNNI (an x86_64 /proc/cpuinfo of its own), an aarch64 one, and none readable."""
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu, "CPUINFO", cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_1 avx avx2 fma bmi1 bmi2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu.cpu_features() == {"fpu", "sse4_1", "avx", "avx2", "fma", "bmi1", "bmi2"}
    bad = _needing(artifacts["x86_64"], tmp_path / "bad.edgeq", ["avx2", "avx512_vnni", "avx512vbmi"])
    assert refusal(bad) == (
        f"{bad}: built for a CPU with avx512_vnni, avx512vbmi, which this CPU lacks: recompile for target x86_64 "
        "(the x86-64-v3 baseline) or on this machine"
    )
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm asimddp\n")
    assert cpu.cpu_features() == {"fp", "asimd", "evtstrm", "asimddp"}
    cpuinfo.unlink()
    assert cpu.cpu_features() is None and cpu.missing_features(["avx512_vnni"]) == []
    with Model.load(bad) as model:  # unreadable: nothing is refused
        assert model.arch == "x86_64"


# ---- threads ------------------------------------------------------------------------------------------------------


def test_one_model_runs_from_four_threads_at_once(artifacts):
    """4 threads x 200 calls on one model (float inputs: each thread's VM quantizes them too) give the outputs of
    one thread; before each thread had its own VM, TVM's VM crashed or mixed up registers."""
    generator = np.random.default_rng(1)
    inputs = [generator.normal(size=SHAPE).astype(np.float32) for _ in range(8)]
    with Model.load(artifacts["x86_64"]) as model:  # every core: each thread's parallel kernels on a pool of its own
        expected = [model.run(x, raw=True) for x in inputs]
        barrier, failures = threading.Barrier(4), []

        def work(offset: int) -> None:
            barrier.wait()
            try:
                for call in range(200):
                    index = (call + offset) % len(inputs)
                    got = model.run(inputs[index], raw=True)
                    if any(not np.array_equal(got[name], expected[index][name]) for name in got):
                        failures.append(f"thread {offset}, call {call}: other outputs")
                model.benchmark(inputs[offset], warmup=0, runs=2)
            except Exception as error:  # noqa: BLE001 - reported by the assertion below
                failures.append(f"thread {offset}: {error!r}")

        threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


# ---- edgeq run: inputs ----------------------------------------------------------------------------------------


def npy_with_header(path: Path, header: dict, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> Path:
    """An .npy file with ``header`` (whatever it claims) and ``data``."""
    with open(path, "wb") as file:
        if version == (1, 0):
            np.lib.format.write_array_header_1_0(file, header)
        else:
            np.lib.format.write_array_header_2_0(file, header)
        file.write(data)
    return path


def _header(descr: str, shape: tuple[int, ...]) -> dict:
    return {"descr": descr, "fortran_order": False, "shape": shape}


def npy_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD_NPY = {
    "233 TiB": (lambda p: npy_with_header(p, _header("|u1", (256_000_000_000_000,)), b"\0" * 64),
                "input 'x' has shape [256000000000000]; expected [2, 3, 8, 8]"),
    "2^40 x 2^40": (lambda p: npy_with_header(p, _header("<f8", (2**40, 2**40))), "input 'x' has shape [1099511627776, 1099511627776]; expected [2, 3, 8, 8]"),
    "truncated data": (lambda p: npy_with_header(p, _header("<f4", SHAPE), b"\0" * 100), "truncated: its header announces 1536 bytes of data, it holds 100"),
    "object dtype": (lambda p: npy_with_header(p, _header("|O", SHAPE)), "input 'x' has dtype object; expected int8 (raw) or a float array to quantize"),
    "int32": (lambda p: npy_with_header(p, _header("<i4", SHAPE), b"\0" * 1536), "input 'x' has dtype int32; expected int8 (raw) or a float array to quantize"),
    "text": (lambda p: npy_bytes(p, b"not an array"), "not a .npy file"),
    "empty": (lambda p: npy_bytes(p, b""), "not a .npy file"),
    "header not a dict": (lambda p: npy_bytes(p, b"\x93NUMPY\x01\x00\x10\x00[1, 2, 3]      \n"),
                          "not a valid .npy header (Header is not a dictionary: [1, 2, 3])"),
    "header an unclosed literal": (lambda p: npy_bytes(p, b"\x93NUMPY\x01\x00\x10\x00{'descr': ('<f4'\n"),
                                   "not a valid .npy header (('EOF in multi-line statement', (2, 0)))"),
    "version 3.0": (lambda p: npy_bytes(p, b"\x93NUMPY\x03\x00\x10\x00\x00\x00{}" + b" " * 13 + b"\n"),
                    ".npy format version 3.0 is not read (1.0 and 2.0 are)"),
    "missing": (lambda p: p, "no such file"),
    "a folder": (lambda p: p.mkdir() or p, "a folder, not a file; give the path of a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPY))
def test_edgeq_run_checks_npy_headers_before_their_data(case, artifacts, tmp_path, capsys):
    make, expected = BAD_NPY[case]
    path = make(tmp_path / "x.npy")
    assert main(["run", str(artifacts["x86_64"]), "--input", str(path), "--output-dir", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"edgeq run: error: {path}: {expected}"
    assert not list((tmp_path / "out").iterdir())


def test_edgeq_run_takes_a_fortran_order_or_version_2_npy(artifacts, tmp_path, x_npy):
    x = np.load(x_npy)
    with Model.load(artifacts["x86_64"]) as model:
        expected = model.run(x, raw=True)
    fortran = tmp_path / "fortran.npy"
    np.save(fortran, np.asfortranarray(x))
    version_2 = npy_with_header(tmp_path / "v2.npy", _header("<f4", SHAPE), x.tobytes(), version=(2, 0))
    for path in (fortran, version_2):
        out = tmp_path / path.stem
        assert main(["run", str(artifacts["x86_64"]), "--input", str(path), "--output-dir", str(out), "--raw"]) == 0
        for name, value in expected.items():
            np.testing.assert_array_equal(np.load(out / f"{name}.npy"), value)


def test_edgeq_run_counts_the_inputs(artifacts, tmp_path, capsys):
    assert main(["run", str(artifacts["x86_64"]), "--output-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"edgeq run: error: {artifacts['x86_64']}: 0 input(s) given; the model takes 1"


# ---- edgeq run: outputs only inside the output folder ---------------------------------------------------------


def test_outputs_are_written_under_their_file_names(artifacts, tmp_path, x_npy):
    renamed = rewrite_artifact(artifacts["x86_64"], tmp_path / "renamed.edgeq", _set("outputs", 0, "file", to="logits"))
    out = tmp_path / "out"
    assert main(["run", str(renamed), "--input", str(x_npy), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dequant_map.npy", "logits.npy"]


@pytest.mark.parametrize("runtime", ["python", "cpp"])
def test_an_escaping_output_name_never_writes_outside(artifacts, tmp_path, x_npy, capsys, runtime):
    out = tmp_path / "a" / "b"
    escaping = rewrite_artifact(artifacts["x86_64"], tmp_path / "escaping.edgeq", _set("outputs", 0, "file", to="../../pwned"))
    assert main(["run", str(escaping), "--input", str(x_npy), "--output-dir", str(out), "--runtime", runtime]) == 1
    assert f"manifest.json: outputs[0].file '../../pwned' is not allowed {SAFE_NAME_RULE}" in capsys.readouterr().err
    assert not list(tmp_path.rglob("pwned*"))


@pytest.mark.parametrize("runtime", ["python", "cpp"])
def test_an_output_path_leading_outside_through_a_link_is_refused(artifacts, tmp_path, x_npy, capsys, runtime):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "dequant.npy").symlink_to(outside / "dequant.npy")
    assert main(["run", str(artifacts["x86_64"]), "--input", str(x_npy), "--output-dir", str(out), "--runtime", runtime]) == 1
    assert capsys.readouterr().err.strip() == (
        f"edgeq run: error: {out / 'dequant.npy'}: leads to {outside / 'dequant.npy'}, outside the output folder "
        f"{out}; nothing was written"
    )
    assert not list(outside.iterdir()) and sorted(p.name for p in out.iterdir()) == ["dequant.npy"]


def test_an_output_folder_that_cannot_be_written_is_refused_naming_the_file(artifacts, tmp_path, x_npy, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        assert main(["run", str(artifacts["x86_64"]), "--input", str(x_npy), "--output-dir", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"edgeq run: error: {re.escape(str(out / 'dequant.npy'))}: cannot write: (Permission denied|Operation not permitted)", error), error
    assert not list(out.iterdir())


def test_a_folder_in_the_way_of_an_output_is_refused_and_nothing_is_left_half_written(artifacts, tmp_path, x_npy, capsys):
    out = tmp_path / "out"
    (out / "dequant.npy").mkdir(parents=True)
    assert main(["run", str(artifacts["x86_64"]), "--input", str(x_npy), "--output-dir", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"edgeq run: error: {out / 'dequant.npy'}: a folder is there, not a file; give the path of a file to write"
    )
    assert sorted(p.name for p in out.iterdir()) == ["dequant.npy"]


def test_compiler_records_exactly_the_cpu_features_the_runtimes_check():
    from edgeq.compile.cpu_features import LIBRARY_FEATURES
    from edgeq_runtime.manifest import SCHEMA

    checked = {
        rule["if"]["properties"]["arch"]["const"]: set(rule["then"]["properties"]["cpu_features"]["items"]["enum"])
        for rule in SCHEMA["properties"]["library"]["allOf"]
    }
    assert checked == {arch: set(names.values()) for arch, names in LIBRARY_FEATURES.items()}


# ---- every feature LLVM may use, AMD's too ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zen3_artifact(functional_ops_artifacts) -> Path:
    """A tiny model compiled for a target of the user's own for AMD Zen 3 (LLVM mcpu znver3, which uses SSE4a)."""
    return functional_ops_artifacts("zen3")


def test_an_amd_build_records_sse4a_and_is_refused_by_name_on_a_cpu_without_it(zen3_artifact):
    """Zen's SSE4a is no Intel CPU's: recorded, and refused by name there (before, such an artifact died of SIGILL)."""
    with zipfile.ZipFile(zen3_artifact) as archive:
        features = json.loads(archive.read("manifest.json"))["library"]["cpu_features"]
    assert "sse4a" in features and features == sorted(features)
    assert {"abm", "movbe", "avx2", "fma", "bmi2", "vaes", "vpclmulqdq"} <= set(features)
    present = cpu.cpu_features()
    if present is None or "sse4a" in present:
        pytest.skip("this CPU has SSE4a (an AMD one), or its features cannot be read")
    missing = [name for name in features if name not in present]
    assert refusal(zen3_artifact) == (
        f"{zen3_artifact}: built for a CPU with {', '.join(missing)}, which this CPU lacks: recompile for target x86_64 "
        "(the x86-64-v3 baseline) or on this machine"
    )


LLVM_CPUS = {
    "x86_64": ("x86-64-v3", "haswell", "znver1", "znver3", "znver4", "bdver2", "bdver4", "btver2", "skylake-avx512",
               "icelake-server", "sapphirerapids", "alderlake", "tremont"),
    "aarch64": ("generic", "cortex-a53", "cortex-a55", "cortex-a76", "neoverse-n1", "neoverse-v1", "neoverse-n2", "a64fx"),
}


def test_every_llvm_name_of_the_table_is_a_feature_of_llvm():
    """A misspelt LLVM name would never match, and its instructions would go unrecorded."""
    import tvm
    from tvm.target.codegen import llvm_get_cpu_features

    from edgeq.compile.cpu_features import LIBRARY_FEATURES

    triples = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
    for arch, cpus in LLVM_CPUS.items():
        known = set()
        for mcpu in cpus:
            known |= {str(f) for f in llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mtriple": triples[arch], "mcpu": mcpu}))}
        assert set(LIBRARY_FEATURES[arch]) <= known, set(LIBRARY_FEATURES[arch]) - known


@pytest.mark.parametrize("arch, mcpu, expected", [
    ("x86_64", "x86-64-v3", "abm avx avx2 bmi1 bmi2 f16c fma movbe popcnt sse4_1 sse4_2 ssse3"),
    ("x86_64", "znver3", "abm avx avx2 bmi1 bmi2 f16c fma movbe popcnt sse4_1 sse4_2 sse4a ssse3 vaes vpclmulqdq"),
    ("x86_64", "bdver2", "abm avx bmi1 f16c fma fma4 popcnt sse4_1 sse4_2 sse4a ssse3 tbm xop"),
    ("x86_64", "sapphirerapids", "abm avx avx2 avx512_bf16 avx512_bitalg avx512_fp16 avx512_vbmi2 avx512_vnni avx512_vpopcntdq "
                                 "avx512bw avx512cd avx512dq avx512f avx512ifma avx512vbmi avx512vl avx_vnni bmi1 bmi2 f16c fma "
                                 "gfni movbe popcnt sse4_1 sse4_2 ssse3 vaes vpclmulqdq"),
    ("aarch64", "generic", "asimd"),
    ("aarch64", "cortex-a55", "asimd asimddp fphp"),
    ("aarch64", "neoverse-v1", "asimd asimddp bf16 fphp i8mm sve"),
    ("aarch64", "neoverse-n2", "asimd asimddp bf16 fphp i8mm sve sve2"),
])
def test_library_features_of_llvm_cpus(arch, mcpu, expected):
    import tvm

    from edgeq.compile.cpu_features import library_features

    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}[arch]
    assert library_features(tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu})) == expected.split()
