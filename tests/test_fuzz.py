"""A bounded fuzz test of everything a user hands edgeq: ONNX files, artifact manifests, target files and .npy
inputs, each mutated at random (seeded, so a failure reproduces). Whatever the mutation, the outcome is a clean
error (one line, naming what is wrong) or a correct result: never a signal, a Python traceback, or a file written
outside the output folder."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from models import FunctionalOps, integer_model

from edgeq.cli import main
from edgeq.compile import compile_model
from edgeq.errors import EdgeqError
from edgeq.export import to_onnx
from edgeq.targets import load_target
from edgeq_runtime import ArtifactError, Model

pytestmark = pytest.mark.flow  # hundreds of runs through both runtimes and the CLI

REPO = Path(__file__).resolve().parent.parent
EDGEQ_RUN = REPO / "runtime" / "cpp" / "build" / "x86_64" / "edgeq-run"
ESCAPES = ("../../pwned_fuzz", "/tmp/edgeq_pwned_fuzz", "..", ".", "a/../../b", "")
"""Names that would write outside a folder if a reader took them as paths."""
VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 7, 2**31, 2**40, -(2**63), 0.0, -0.5, 1e-45, 1e30, 1e308, float("nan"), float("inf"),
    "", "x", "int8", "float64", [], [0], [[[[]]]], {}, {"a": 1}, *ESCAPES,
)
"""Replacement values for manifest fields: wrong types, limits, non-finite numbers, nesting, escaping names."""
CASES = 40
"""Mutations per kind of input (a few seconds each at most)."""


@dataclass(frozen=True)
class Subject:
    """A small valid model in every form: its QDQ ONNX file, its artifact, a raw input and its raw outputs."""

    onnx_path: Path
    artifact: Path
    raw_input: Path
    outputs: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def subject(tmp_path_factory, cpp_build) -> Subject:
    """The FunctionalOps model in every form; ``cpp_build``: the C++ runtime :func:`run_cpp` runs is built."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    folder = tmp_path_factory.mktemp("fuzz")
    onnx_path = to_onnx(integer_model(FunctionalOps().eval(), example, "x86_64"), (example,), folder / "m.onnx")
    artifact = compile_model(onnx_path, target="x86_64", out=folder / "m.edgeq").artifact
    with Model.load(artifact) as model:
        raw = model.inputs[0].quantize(example.numpy())
        outputs = model.run(raw, raw=True)
    np.save(folder / "x.npy", raw)
    return Subject(onnx_path, artifact, folder / "x.npy", outputs)


@pytest.fixture(autouse=True)
def no_escape():
    """Nothing any case does may create the files an escaping name would write."""
    sentinels = [Path("/tmp/edgeq_pwned_fuzz.npy"), Path("/tmp/edgeq_pwned_fuzz")]
    yield
    for sentinel in sentinels:
        assert not sentinel.exists(), f"a name escaped its folder: {sentinel} was written"


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``edgeq argv`` in this process: its exit status and standard error. An exception escaping ``main`` (a
    traceback for a user) fails the test."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 1:
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1, f"expected one error line, got:\n{err}"
    return code, err


def run_cpp(argv: list[str]) -> subprocess.CompletedProcess:
    """``edgeq-run argv``: it exits 0, 1 (a refusal, one line) or 2 (usage), never by a signal."""
    completed = subprocess.run([str(EDGEQ_RUN), *argv], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode in (0, 1, 2), f"edgeq-run ended with {completed.returncode}: {completed.stderr[-2000:]}"
    if completed.returncode:
        assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    return completed


def assert_outputs_correct(folder: Path, outputs: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Every output a run wrote is the expected one (raw integers), under its file name, inside ``folder``."""
    for entry, (name, expected) in zip(manifest["outputs"], outputs.items(), strict=True):
        written = folder / f"{entry['file']}.npy"
        assert written.resolve().parent == folder.resolve()
        np.testing.assert_array_equal(np.load(written), expected, err_msg=name)


# ---- manifests --------------------------------------------------------------------------------------------------


def leaves(node: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every path into a JSON document (objects' keys, lists' indices), the root's children first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        yield (*path, key)
        yield from leaves(child, (*path, key))


def mutate_manifest(manifest: dict[str, Any], rng: random.Random) -> str:
    """Change one field of ``manifest`` in place (replace, delete or add a key); returns what was done."""
    paths = [p for p in leaves(manifest) if p[0] not in ("members", "placement")]
    path = rng.choice(paths)
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(("replace", "replace", "replace", "delete", "add"))
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent["unexpected"] = 1
    else:
        parent[path[-1]] = rng.choice(VALUES)
    return f"{action} {'.'.join(map(str, path))}"


def write_manifest(source: Path, target: Path, manifest: dict[str, Any] | str) -> Path:
    """``source`` with its manifest replaced (its zip CRC recomputed, as an editing user would)."""
    with zipfile.ZipFile(source) as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist() if i.filename != "manifest.json"}
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.json", manifest if isinstance(manifest, str) else json.dumps(manifest))
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def read_manifest(artifact: Path) -> dict[str, Any]:
    with zipfile.ZipFile(artifact) as archive:
        return json.loads(archive.read("manifest.json"))


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_manifest_is_refused_cleanly_or_runs_correctly(subject, tmp_path, seed):
    rng = random.Random(seed)
    manifest = read_manifest(subject.artifact)
    what = mutate_manifest(manifest, rng)
    artifact = write_manifest(subject.artifact, tmp_path / "m.edgeq", manifest)
    before = files_under(tmp_path)
    try:
        with Model.load(artifact) as model:
            outputs = model.run(np.load(subject.raw_input), raw=True)
        for got, expected in zip(outputs.values(), subject.outputs.values(), strict=True):
            np.testing.assert_array_equal(got, expected, err_msg=what)
    except (ArtifactError, ValueError) as error:
        assert "\n" not in str(error), what
    out = tmp_path / "out"
    completed = run_cpp([str(artifact), "--input", str(subject.raw_input), "--output-dir", str(out), "--raw"])
    if completed.returncode == 0:
        assert_outputs_correct(out, subject.outputs, manifest)
    assert {p for p in files_under(tmp_path) - before if out not in p.parents and p != out} == set(), what


def test_deeply_nested_manifest_is_refused(subject, tmp_path):
    artifact = write_manifest(subject.artifact, tmp_path / "m.edgeq", "[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match="nested"):
        Model.load(artifact)
    assert run_cpp([str(artifact), "--input", str(subject.raw_input), "--output-dir", str(tmp_path / "out")]).returncode == 1


# ---- .npy inputs ------------------------------------------------------------------------------------------------


def mutate_npy(data: bytes, rng: random.Random) -> bytes:
    """One change to an .npy file: its header's shape or dtype, a truncation, or flipped bytes."""
    header_end = data.index(b"\n") + 1
    header = data[:header_end].decode("latin-1")
    choice = rng.randrange(5)
    if choice == 0:
        shape = rng.choice(["(2**40, 2**40)", "(256000000000000,)", "(-1, 3, 8, 8)", "()", "(0, 3, 8, 8)", "(2, 3, 8)"])
        header = re.sub(r"'shape': \([^)]*\)", f"'shape': {shape}", header)
    elif choice == 1:
        header = re.sub(r"'descr': '[^']*'", f"'descr': '{rng.choice(['<f8', '|u1', '<i4', '|O', '>i2', 'zz'])}'", header)
    elif choice == 2:
        return data[: rng.randrange(len(data))]
    elif choice == 3:
        header = header.replace("False", "True")  # fortran_order
    else:
        spoilt = bytearray(data)
        for _ in range(4):
            spoilt[rng.randrange(len(spoilt))] = rng.randrange(256)
        return bytes(spoilt)
    body = data[header_end:]
    return header[:-1].ljust(header_end - 1).encode("latin-1")[: header_end - 1] + b"\n" + body


@pytest.mark.parametrize("seed", range(CASES // 2))
def test_mutated_input_is_refused_cleanly_or_runs_correctly(subject, tmp_path, seed, capsys):
    rng = random.Random(seed)
    spoilt = tmp_path / "x.npy"
    spoilt.write_bytes(mutate_npy(subject.raw_input.read_bytes(), rng))
    manifest = read_manifest(subject.artifact)
    for runtime in ("python", "cpp"):
        out = tmp_path / f"out-{runtime}"
        code, err = run_cli(["run", str(subject.artifact), "--input", str(spoilt), "--output-dir", str(out), "--raw", "--runtime", runtime], capsys)
        if code == 0:  # a valid .npy file still (another value, or Fortran order): the model's outputs for it
            with Model.load(subject.artifact) as model:
                assert_outputs_correct(out, model.run(np.load(spoilt), raw=True), manifest)
        else:
            assert str(spoilt) in err, err


# ---- ONNX files -------------------------------------------------------------------------------------------------


def _initializers(model: onnx.ModelProto, suffix: str) -> list[onnx.TensorProto]:
    return [i for i in model.graph.initializer if i.name.endswith(suffix)]


def mutate_onnx(model: onnx.ModelProto, rng: random.Random) -> str:
    """One change to a QDQ ONNX model, in place: a scale, a zero point, an input's dimension, a node's name or
    attribute, a tensor's name, or a node removed; returns what was done."""
    graph = model.graph
    choice = rng.randrange(7)
    if choice == 0:
        scale = rng.choice(_initializers(model, "scale"))
        value = rng.choice([0.0, -1.0, 1e30, 1e-45, float("nan"), float("inf"), 1e-30])
        scale.CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(scale).shape, value, np.float32), scale.name))
        return f"scale {scale.name} = {value}"
    if choice == 1:
        zero = rng.choice(_initializers(model, "zero_point"))
        values = np.full(onnx.numpy_helper.to_array(zero).shape, rng.choice([1000, -1000, 2**20]), np.int32)
        zero.CopyFrom(onnx.numpy_helper.from_array(values, zero.name))
        return f"zero point {zero.name} = {values.flat[0] if values.size else values} (int32)"
    if choice == 2:
        dim = rng.choice(list(graph.input[0].type.tensor_type.shape.dim))
        dim.dim_value = rng.choice([0, -5, 2**40])
        return f"input dim {dim.dim_value}"
    if choice == 3 and len(graph.node) > 1:
        first, second = rng.sample(list(graph.node), 2)
        second.name = first.name
        return f"duplicate node name {first.name}"
    if choice == 4:
        nodes = [n for n in graph.node if any(a.type == onnx.AttributeProto.INTS or a.type == onnx.AttributeProto.INT for a in n.attribute)]
        node = rng.choice(nodes)
        attribute = rng.choice([a for a in node.attribute if a.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.INT)])
        value = rng.choice([0, -1, 7, 10**9])
        if attribute.type == onnx.AttributeProto.INT:
            attribute.i = value
        else:
            attribute.ints[:] = [value] * len(attribute.ints)
        return f"{node.name}.{attribute.name} = {value}"
    if choice == 5:
        name = rng.choice(ESCAPES[:3])
        old = graph.output[0].name
        graph.output[0].name = name
        for node in graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
        return f"output renamed {name!r}"
    node = rng.choice(list(graph.node))
    graph.node.remove(node)
    return f"node {node.name} removed"


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_onnx_is_refused_cleanly_or_checks(subject, tmp_path, seed, capsys):
    rng = random.Random(seed)
    model = onnx.load(subject.onnx_path)
    what = mutate_onnx(model, rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, err = run_cli(["check", str(path), "--target", "x86_64"], capsys)
    assert code in (0, 1, 4), what
    if code == 1:
        assert str(path) in err or "'" in err, f"{what}: the error names neither the file nor a node: {err}"
    if code == 0 and seed % 4 == 0:  # a compile now and then: what check passes, compile builds or refuses cleanly
        out = tmp_path / "out"
        compile_code, _ = run_cli(["compile", str(path), "--target", "x86_64", "-o", str(out / "m.edgeq")], capsys)
        assert compile_code in (0, 1), what
        if compile_code == 0:
            run_cpp([str(out / "m.edgeq"), "--input", str(subject.raw_input), "--output-dir", str(out / "run"), "--raw"])
    assert not (tmp_path.parent / "pwned_fuzz.npy").exists()


def test_truncated_onnx_is_refused_cleanly(subject, tmp_path, capsys):
    data = subject.onnx_path.read_bytes()
    for cut in (0, 7, len(data) // 3, len(data) - 1):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        code, err = run_cli(["check", str(path), "--target", "x86_64"], capsys)
        assert code == 1 and str(path) in err


# ---- target files -----------------------------------------------------------------------------------------------

TOML_VALUES = ("true", '"1000000000"', "256.0", "inf", "nan", "-1", "0", '"pentium-9000"', "[]", '"../../x"', '["+nosuchfeature"]', "{}")


def mutate_target(text: str, rng: random.Random) -> str:
    """One change to a target file's text: a value replaced by one of :data:`TOML_VALUES`, or a line removed."""
    lines = text.splitlines()
    settings = [i for i, line in enumerate(lines) if re.match(r"^\s*[A-Za-z_]+\s*=", line) and not line.startswith("name")]
    index = rng.choice(settings)
    if rng.random() < 0.2:
        del lines[index]
    else:
        key = lines[index].split("=", 1)[0]
        lines[index] = f"{key}= {rng.choice(TOML_VALUES)}"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", range(CASES // 2))
@pytest.mark.parametrize("base", ["x86_64", "npu-s"])
def test_mutated_target_file_is_refused_cleanly_or_works(subject, tmp_path, seed, base, capsys):
    rng = random.Random(seed)
    path = tmp_path / f"{base}.toml"
    path.write_text(mutate_target((REPO / "targets" / f"{base}.toml").read_text(), rng))
    try:
        load_target(path)
    except EdgeqError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    code, err = run_cli(["check", str(subject.onnx_path), "--target", str(path)], capsys)
    assert code in (0, 4), err


def test_unreadable_target_files_are_refused_cleanly(tmp_path):
    cases: dict[str, Callable[[Path], None]] = {
        "not-utf8.toml": lambda p: p.write_bytes(b'name = "\xff\xfe"\n'),
        "folder.toml": lambda p: p.mkdir(),
        "missing.toml": lambda p: None,
        "invalid.toml": lambda p: p.write_text("name = \n[[[\n"),
    }
    for name, make in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(EdgeqError, match=re.escape(str(path))):
            load_target(path)
    shutil.rmtree(tmp_path / "folder.toml")
