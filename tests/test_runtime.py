"""The runtimes: Python (edgeq_runtime) and C++ (edgeq-run, x86_64 and aarch64 under qemu), exact against each
other and the integer model, refusing bad artifacts and inputs with clear errors, never crashing."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from models import BatchNorms1d, DataMovement, FunctionalOps, integer_model, rewrite_artifact, torchvision_model, with_batchnorm_statistics

from edgeq.cli import main
from edgeq.compile import compile_model
from edgeq.compile.artifact import LIBRARY
from edgeq_runtime import ArtifactError, Model
from edgeq_runtime.model import TensorInfo
from edgeq_runtime.vm import POOL_SPIN_COUNT, RuntimeLibraryError, available_cores, pool_threads

pytestmark = pytest.mark.flow  # builds the C++ runtime and runs artifacts through both runtimes, aarch64 under qemu

REPO = Path(__file__).resolve().parent.parent
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]


@pytest.fixture(scope="session")
def edgeq_run(cpp_build) -> dict[str, Path]:
    """The C++ runtime for x86_64, x86_64 with AddressSanitizer, and aarch64 (:func:`conftest.cpp_build`)."""
    return {variant: cpp_build / variant / "edgeq-run" for variant in ("x86_64", "x86_64-asan", "aarch64")}


def dotprod_target(folder: Path) -> Path:
    """A target file of the user's: the aarch64 CPU with the dot-product extension."""
    aarch64 = (REPO / "targets" / "aarch64.toml").read_text()
    path = folder / "aarch64-dotprod.toml"
    path.write_text(aarch64.replace('name = "aarch64"', 'name = "aarch64-dotprod"').replace('mattr = ["+neon"]', 'mattr = ["+neon", "+dotprod"]'))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A two-output model compiled for this machine (simulated NPU), for npu-s on its aarch64 host, for the
    aarch64 CPU, and for an aarch64 CPU with the dot-product extension (a target file of the user's); with the
    integer model and an input file."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    int_model = integer_model(FunctionalOps().eval(), example, "npu-s")
    folder = tmp_path_factory.mktemp("runtime")
    dotprod = dotprod_target(folder)
    artifacts = {
        "x86_64": compile_model(int_model, (example,), out=folder / "x86.edgeq", simulate=True).artifact,
        "npu-s": compile_model(int_model, (example,), out=folder / "npu.edgeq").artifact,
        "aarch64": compile_model(int_model, (example,), target="aarch64", out=folder / "arm.edgeq").artifact,
        "aarch64-dotprod": compile_model(int_model, (example,), target=dotprod, out=folder / "arm-dotprod.edgeq").artifact,
    }
    x = torch.randn(2, 3, 8, 8)
    np.save(folder / "x.npy", x.numpy())
    return int_model, artifacts, x, folder


def run_cli(command: list[str], *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], capture_output=True, text=True, errors="replace", check=False, env=env, timeout=120)


def cli_outputs(command: list[str], artifact: Path, inputs: list[Path], folder: Path, raw: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(exist_ok=True)
    args = [str(artifact), "--output-dir", str(folder), *sum((["--input", str(i)] for i in inputs), [])]
    completed = run_cli(command, *args, *(["--raw"] if raw else []))
    assert completed.returncode == 0, completed.stderr
    return {p.stem: np.load(p) for p in folder.glob("*.npy")}


# ---- exactness --------------------------------------------------------------------------------------------------


def test_python_runtime_equals_the_integer_model(models):
    int_model, artifacts, x, _ = models
    with Model.load(artifacts["x86_64"]) as model:
        assert model.target == "npu-s" and model.arch == "x86_64"
        outputs = model.run({"x": x.numpy()}, raw=True)
    for got, expected in zip(outputs.values(), int_model.run_integer(x)):
        np.testing.assert_array_equal(got, expected.numpy())


def test_python_runtime_quantizes_ties_to_even_and_saturates():
    """Float inputs: ``saturate(round_half_to_even(float32(x) / float32(s)) + zero_point)``, also for values far past
    the integer range (an int64 conversion on the way wrapped 1e30 to the low limit); NaN is the zero point, as in the
    C++ runtime."""
    x = np.array([0.25, 0.75, -0.25, 1e30, -1e30, np.inf, 200.0, -1.75], np.float32)  # / 0.5: ties, limits
    uint8 = TensorInfo("x", (9,), "uint8", np.float32([0.5]), np.int64([3]), None)
    assert uint8.quantize(np.append(x, np.nan)).tolist() == [3, 5, 3, 255, 0, 255, 255, 0, 3]
    per_channel = TensorInfo("x", (2, 4), "int8", np.float32([0.5, 0.25]), np.int64([0, -1]), 0)
    assert per_channel.quantize(x.reshape(2, 4)).tolist() == [[0, 2, 0, 127], [-128, 127, 127, -8]]
    np.testing.assert_array_equal(per_channel.dequantize(np.int8([[2, -128], [127, -8]])), [[1.0, -64.0], [32.0, -1.75]])


def test_cpp_cli_equals_the_python_runtime(models, edgeq_run, tmp_path):
    _, artifacts, x, folder = models
    with Model.load(artifacts["x86_64"]) as model:
        raw = model.run(x.numpy(), raw=True)
        dequantized = model.run(x.numpy())
    cpp_raw = cli_outputs([str(edgeq_run["x86_64"])], artifacts["x86_64"], [folder / "x.npy"], tmp_path / "raw")
    cpp_float = cli_outputs([str(edgeq_run["x86_64"])], artifacts["x86_64"], [folder / "x.npy"], tmp_path / "float", raw=False)
    for name in raw:
        np.testing.assert_array_equal(cpp_raw[name], raw[name])
        assert cpp_raw[name].dtype == raw[name].dtype
        np.testing.assert_array_equal(cpp_float[name], dequantized[name])


def test_cpp_cli_takes_raw_int8_inputs(models, edgeq_run, tmp_path):
    int_model, artifacts, x, _ = models
    raw_input = int_model.graph_module.quant(x).numpy()
    np.save(tmp_path / "q.npy", raw_input)
    outputs = cli_outputs([str(edgeq_run["x86_64"])], artifacts["x86_64"], [tmp_path / "q.npy"], tmp_path / "out")
    for name, expected in zip(("dequant", "dequant_map"), int_model.run_integer(x)):
        np.testing.assert_array_equal(outputs[name], expected.numpy())


def test_data_movement_in_both_runtimes(edgeq_run, tmp_path):
    """tests/models.py's DataMovement (rolls along axes and of the flattened tensor among them) compiled for x86_64:
    edgeq-run and the Python runtime give the integer model's integers."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 8, 8)
    int_model = integer_model(DataMovement().eval(), example, "x86_64")
    artifact = compile_model(int_model, (example,), target="x86_64", out=tmp_path / "moves.edgeq").artifact
    x = torch.randn(2, 4, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    expected = int_model.run_integer(x).numpy()
    with Model.load(artifact) as model:
        (python,) = model.run(x.numpy(), raw=True).values()
    (cpp,) = cli_outputs([str(edgeq_run["x86_64"])], artifact, [tmp_path / "x.npy"], tmp_path / "out").values()
    np.testing.assert_array_equal(python, expected)
    np.testing.assert_array_equal(cpp, expected)


def test_aarch64_dotprod_artifact_uses_sdot(models, tmp_path):
    """Built for a target with ``+dotprod``, the convolutions multiply with ``sdot`` (docs/compile.md); plain
    NEON without it."""
    _, artifacts, _, _ = models

    def disassembly(which: str) -> str:
        library = tmp_path / f"{which}.so"
        with zipfile.ZipFile(artifacts[which]) as archive:
            library.write_bytes(archive.read(LIBRARY))
        return subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout

    assert "sdot" in disassembly("aarch64-dotprod")
    assert "sdot" not in disassembly("aarch64")


@pytest.mark.parametrize("which", ["npu-s", "aarch64", "aarch64-dotprod"])
def test_aarch64_cli_under_qemu_equals_x86_64(models, edgeq_run, tmp_path, which):
    int_model, artifacts, x, folder = models
    with Model.load(artifacts["x86_64"]) as model:
        expected = model.run(x.numpy(), raw=True)
    got = cli_outputs([*QEMU, str(edgeq_run["aarch64"])], artifacts[which], [folder / "x.npy"], tmp_path / which)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.fixture(scope="module")
def built_here(tmp_path_factory):
    """A torchvision model at 32x32 quantized for aarch64, with the same program built for this machine (compiled once
    for both aarch64 builds below): the integer model, its example and the x86_64 artifact, by model name."""
    made = {}

    def of(name):
        if name not in made:
            torch.manual_seed(0)
            example = torch.randn(1, 3, 32, 32)
            int_model = integer_model(torchvision_model(name), example, "aarch64")
            out = tmp_path_factory.mktemp(name) / "here.edgeq"
            made[name] = int_model, example, compile_model(int_model, (example,), out=out, simulate=True).artifact
        return made[name]

    return of


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
@pytest.mark.parametrize("dotprod", [False, True], ids=["neon", "dotprod"])
def test_aarch64_depthwise_kernels_under_qemu_equal_x86_64(edgeq_run, built_here, tmp_path, dotprod, name):
    """Depthwise convolutions on aarch64 (NEON int16 products; with ``+dotprod``, ``sdot`` on 4 taps of 4 channels;
    rows packed per part inside the parallel loop) and the input quantizer, run by the C++ runtime under qemu,
    equal the same program built for this machine: mobilenet_v2 at 32x32, whose depthwise layers have strides 1 and
    2 and even and odd row counts; mobilenet_v3_small, whose convolutions end in table activations (read per tile
    after the requantization) and whose squeeze-and-excitation scalings broadcast per-channel results."""
    int_model, example, here = built_here(name)
    target = dotprod_target(tmp_path) if dotprod else "aarch64"
    arm = compile_model(int_model, (example,), target=target, out=tmp_path / "arm.edgeq").artifact
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, 32).numpy()
    np.save(tmp_path / "x.npy", x)
    with Model.load(here) as model:
        expected = model.run(x, raw=True)
    got = cli_outputs([*QEMU, str(edgeq_run["aarch64"])], arm, [tmp_path / "x.npy"], tmp_path / "out")
    for output in expected:
        np.testing.assert_array_equal(got[output], expected[output])


def test_cpp_runtime_runs_batchnorm1d(edgeq_run, tmp_path):
    """BatchNorm1d folded into linear layers and alone (tests/models.py's BatchNorms1d), compiled for npu-m's board
    and for this machine: the C++ runtime's outputs, on x86_64 and on aarch64 under qemu, equal the integer model's."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 6)
    int_model = integer_model(with_batchnorm_statistics(BatchNorms1d(), (8, 4, 6)), example, "npu-m")
    board = compile_model(int_model, (example,), out=tmp_path / "board.edgeq").artifact
    here = compile_model(int_model, (example,), out=tmp_path / "here.edgeq", simulate=True).artifact
    x = torch.randn(2, 4, 6)
    np.save(tmp_path / "x.npy", x.numpy())
    expected = int_model.run_integer(x).numpy()
    for command, artifact in (([str(edgeq_run["x86_64"])], here), ([*QEMU, str(edgeq_run["aarch64"])], board)):
        (got,) = cli_outputs(command, artifact, [tmp_path / "x.npy"], tmp_path / artifact.stem).values()
        np.testing.assert_array_equal(got, expected)


def test_runtime_imports_without_torch_onnx_or_the_tvm_compiler(models):
    _, artifacts, x, folder = models
    script = f"""
import sys
for name in ("torch", "onnx", "onnxruntime", "tvm", "edgeq"):
    sys.modules[name] = None  # any import of these now fails
import numpy as np
from edgeq_runtime import Model
with Model.load({str(artifacts["x86_64"])!r}) as model:
    outputs = model.run(np.load({str(folder / "x.npy")!r}))
print(sorted(outputs))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "['dequant', 'dequant_map']"


@pytest.mark.parametrize("preset", [None, "7"])
def test_python_runtime_bounds_how_long_idle_workers_spin(models, preset):
    """TVM's pool workers spin 300000 yields before sleeping (a busy core for 70 ms after every inference here):
    the runtime sets TVM_THREAD_POOL_SPIN_COUNT to its bound before the first pool starts, unless it is set."""
    _, artifacts, x, _ = models
    script = f"""
import os
import numpy as np
from edgeq_runtime import Model
with Model.load({str(artifacts["x86_64"])!r}) as model:
    model.run(np.zeros({tuple(x.shape)!r}, np.float32))
print(os.environ["TVM_THREAD_POOL_SPIN_COUNT"])
"""
    env = {key: value for key, value in os.environ.items() if key != "TVM_THREAD_POOL_SPIN_COUNT"}
    if preset is not None:
        env["TVM_THREAD_POOL_SPIN_COUNT"] = preset
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, env=env)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == (preset or str(POOL_SPIN_COUNT))


# ---- bad artifacts: both runtimes give clear errors ----------------------------------------------------------


def _flip(manifest, members):
    library = bytearray(members["model.so"])
    library[len(library) // 2] ^= 0xFF
    members["model.so"] = bytes(library)


def _drop(manifest, members):
    del members["npu_program.json"]


def _future(manifest, members):
    manifest["schema_version"] = 4


def _elsewhere(manifest, members):
    manifest["library"]["arch"] = "riscv64"


def _escape(manifest, members):
    members["../evil.so"] = b"x"
    manifest["members"]["../evil.so"] = {"size": 1, "sha256": "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"}


def _unknown_quantizer(manifest, members):
    manifest["inputs"][0]["quantizer"] = "quantize_nothing"


BAD_ARTIFACTS = {
    "flipped byte": (_flip, "member model.so fails its sha256 check"),
    "missing member": (_drop, "npu_program.json"),
    "future schema": (_future, "schema version 4; this runtime reads versions 2 and 3"),
    "other architecture": (_elsewhere, 'library.arch must be "x86_64" or "aarch64"; got "riscv64"'),
    "path traversal": (_escape, "member name '../evil.so' is not allowed"),
    "unknown quantizer": (_unknown_quantizer, "the library has no function 'quantize_nothing' (input 'x''s quantizer)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARTIFACTS))
def test_bad_artifacts_are_refused_by_both_runtimes(case, models, edgeq_run, tmp_path):
    change, message = BAD_ARTIFACTS[case]
    bad = rewrite_artifact(models[1]["x86_64"], tmp_path / "bad.edgeq", change)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        Model.load(bad)
    completed = run_cli([str(edgeq_run["x86_64"])], str(bad), "--input", str(models[3] / "x.npy"), "--output-dir", str(tmp_path))
    assert completed.returncode == 1 and message in completed.stderr, completed.stderr


def test_truncated_artifact(models, edgeq_run, tmp_path):
    data = models[1]["x86_64"].read_bytes()
    truncated = tmp_path / "truncated.edgeq"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not an edgeq artifact, or truncated"):
        Model.load(truncated)
    completed = run_cli([str(edgeq_run["x86_64"])], str(truncated), "--output-dir", str(tmp_path))
    assert completed.returncode == 1 and "not an edgeq artifact, or truncated" in completed.stderr


def test_aarch64_artifact_on_this_machine(models):
    with pytest.raises(ArtifactError, match=r"built for aarch64; this machine is x86_64 \(run it under qemu-aarch64"):
        Model.load(models[1]["npu-s"])


# ---- bad inputs ----------------------------------------------------------------------------------------------------


def test_bad_inputs_python(models):
    _, artifacts, x, _ = models
    with Model.load(artifacts["x86_64"]) as model:
        with pytest.raises(ValueError, match=r"inputs \['image'\] are unknown and \['x'\] missing \(inputs: \['x'\]\)"):
            model.run({"image": x.numpy()})
        with pytest.raises(ValueError, match=r"input 'x' has shape \[1, 3, 8, 8\]; expected \[2, 3, 8, 8\]"):
            model.run(x[:1].numpy())
        with pytest.raises(ValueError, match=r"input 'x' has dtype int32; expected int8 \(raw\) or a float array to quantize"):
            model.run(x.numpy().astype(np.int32))
        with pytest.raises(ValueError, match=r"2 input\(s\) given; the model takes 1"):
            model.run([x.numpy(), x.numpy()])


def test_bad_inputs_cpp(models, edgeq_run, tmp_path):
    _, artifacts, x, _ = models
    binary = [str(edgeq_run["x86_64"])]
    np.save(tmp_path / "small.npy", x[:1].numpy())
    np.save(tmp_path / "int32.npy", x.numpy().astype(np.int32))
    (tmp_path / "text.npy").write_text("not an array")
    out = str(tmp_path)
    cases = [
        (["--input", str(tmp_path / "small.npy")], "input 'x' has shape [1, 3, 8, 8]; expected [2, 3, 8, 8]"),
        (["--input", str(tmp_path / "int32.npy")], "input 'x' has dtype int32; expected int8 (raw) or float32 to quantize"),
        (["--input", str(tmp_path / "text.npy")], "text.npy: not a .npy file"),
        ([], "0 input(s) given; the model takes 1"),
    ]
    for extra, message in cases:
        completed = run_cli(binary, str(artifacts["x86_64"]), "--output-dir", out, *extra)
        assert completed.returncode == 1 and message in completed.stderr, (extra, completed.stderr)
    assert run_cli(binary, str(artifacts["x86_64"])).returncode == 2


# ---- threads -----------------------------------------------------------------------------------------------------


def test_python_runtime_threads(models):
    int_model, artifacts, x, _ = models
    cores = len(available_cores())
    with Model.load(artifacts["x86_64"]) as model:
        assert model.num_threads == cores and model.benchmark(x.numpy(), warmup=0, runs=1).threads == cores
    expected = int_model.run_integer(x)[0].numpy()
    loaded = {n: Model.load(artifacts["x86_64"], num_threads=n) for n in range(1, cores + 1)}
    for count in [*loaded, *reversed(loaded)]:  # models of different counts take turns in one thread
        np.testing.assert_array_equal(loaded[count].run(x.numpy(), raw=True)["dequant"], expected)
        assert pool_threads() == count
    seen = []
    worker = threading.Thread(target=lambda: seen.append(loaded[1].benchmark(x.numpy(), warmup=0, runs=1).threads))
    worker.start()
    worker.join()
    assert seen == [1]  # TVM's pools are per calling thread: a model sets the pool of whichever thread runs it
    for model in loaded.values():
        model.close()


@pytest.mark.skipif(len(available_cores()) < 2, reason="needs two cores")
def test_a_thread_pool_tvm_sized_smaller_first_is_an_error(models, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    errors = []

    def run() -> None:
        pool_threads()  # TVM creates this thread's pool, sized from TVM_NUM_THREADS, before the runtime runs here
        with Model.load(models[1]["x86_64"], num_threads=2) as model, pytest.raises(RuntimeLibraryError) as error:
            model.run(models[2].numpy())
        errors.append(str(error.value))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert errors == [
        f"TVM's thread pool of this thread runs 1 thread(s), not 2: TVM sized it before edgeq_runtime ran here "
        f"(set TVM_NUM_THREADS={len(available_cores())} before the process first uses TVM)"
    ]


@pytest.mark.parametrize("count", [0, -1, 1.5, "2", True, None])
def test_python_runtime_refuses_bad_thread_counts(models, count):
    cores = len(available_cores())
    count = cores + 1 if count is None else count
    with pytest.raises(ValueError,
                       match=rf"num_threads must be a whole number from 1 to {cores} \(the cores this process may use\); got {re.escape(repr(count))}$"):
        Model.load(models[1]["x86_64"], num_threads=count)


def test_cpp_runtime_threads(models, edgeq_run, tmp_path):
    _, artifacts, _, folder = models
    cores = len(available_cores())
    binary = [str(edgeq_run["x86_64"])]
    base = [str(artifacts["x86_64"]), "--input", str(folder / "x.npy"), "--output-dir", str(tmp_path), "--bench", "1"]
    assert f"latency over 1 runs on {cores} thread(s)" in run_cli(binary, *base).stdout
    for count in range(1, cores + 1):
        completed = run_cli(binary, *base, "--threads", str(count))
        assert completed.returncode == 0 and f"latency over 1 runs on {count} thread(s)" in completed.stdout, completed.stderr
    for bad in ("0", "-1", "1.5", "two", ""):
        completed = run_cli(binary, *base, "--threads", bad)
        assert completed.returncode == 2 and f"--threads needs a whole number >= 1; got '{bad}'" in completed.stderr
    completed = run_cli(binary, *base, "--threads", str(cores + 1))
    assert completed.returncode == 1
    assert f"num_threads must be a whole number from 1 to {cores} (the cores this process may use); got {cores + 1}" in completed.stderr


def test_edgeq_run_threads(models, edgeq_run, tmp_path, capsys):
    _, artifacts, _, folder = models
    for artifact, runtime in ((artifacts["x86_64"], "python"), (artifacts["x86_64"], "cpp"), (artifacts["npu-s"], "cpp")):
        command = ["run", str(artifact), "--input", str(folder / "x.npy"), "--output-dir", str(tmp_path), "--runtime", runtime]
        assert main([*command, "--bench", "1", "--threads", "1"]) == 0
        assert "latency over 1 runs on 1 thread(s)" in capsys.readouterr().out
    for bad in ("0", "-2", "1.5"):
        with pytest.raises(SystemExit):
            main([*command, "--threads", bad])
        assert f"argument --threads: expected a whole number >= 1; got '{bad}'" in capsys.readouterr().err
    assert main([*command, "--threads", str(len(available_cores()) + 1)]) == 1
    assert "num_threads must be a whole number from 1 to" in capsys.readouterr().err


# ---- fuzzing the C++ reader under AddressSanitizer --------------------------------------------------------------


def test_random_corruptions_never_crash_the_cpp_runtime(models, edgeq_run, tmp_path):
    """Bounded: 300 corrupted artifacts or 120 seconds, whichever comes first. Every run must end with exit status
    0 (a corruption that changes nothing checked, e.g. a zip timestamp) or 1 with a message, never a signal or an
    AddressSanitizer report."""
    data = models[1]["x86_64"].read_bytes()
    generator = random.Random(1234)
    env = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "PATH": "/usr/bin:/bin"}
    started, runs, refused = time.monotonic(), 0, 0
    while runs < 300 and time.monotonic() - started < 120:
        corrupted = bytearray(data)
        kind = runs % 4
        if kind == 0:  # flip bytes, mostly in the headers and the manifest
            for _ in range(generator.randint(1, 8)):
                corrupted[generator.randrange(min(len(corrupted), 4096)) if generator.random() < 0.7
                          else generator.randrange(len(corrupted))] ^= 1 << generator.randrange(8)
        elif kind == 1:  # truncate
            corrupted = corrupted[: generator.randrange(len(corrupted))]
        elif kind == 2:  # overwrite a range with random bytes
            start = generator.randrange(len(corrupted))
            corrupted[start : start + generator.randint(1, 64)] = bytes(generator.randrange(256) for _ in range(64))
        else:  # damage the central directory at the end
            for _ in range(generator.randint(1, 4)):
                corrupted[-generator.randint(1, min(300, len(corrupted)))] = generator.randrange(256)
        path = tmp_path / f"fuzz{runs}.edgeq"
        path.write_bytes(bytes(corrupted))
        completed = run_cli([str(edgeq_run["x86_64-asan"])], str(path), "--input", str(models[3] / "x.npy"), "--output-dir", str(tmp_path), env=env)
        assert completed.returncode in (0, 1), (runs, completed.returncode, completed.stderr[-2000:])
        assert "AddressSanitizer" not in completed.stderr, completed.stderr[-2000:]
        refused += completed.returncode == 1
        runs += 1
        path.unlink()
    assert runs >= 20 and refused >= runs // 2


# ---- edgeq run ------------------------------------------------------------------------------------------------------


def test_edgeq_run_command(models, edgeq_run, tmp_path, capsys):
    _, artifacts, x, folder = models
    for runtime in ("python", "cpp"):
        out = tmp_path / runtime
        out.mkdir()
        assert main(["run", str(artifacts["x86_64"]), "--input", f"x={folder / 'x.npy'}", "--output-dir", str(out), "--runtime", runtime, "--bench", "3"]) == 0
    printed = capsys.readouterr().out
    assert "NPU regions run as a bit-exact simulation" in printed and "latency over 3 runs on" in printed
    for name in ("dequant", "dequant_map"):
        np.testing.assert_array_equal(np.load(tmp_path / "python" / f"{name}.npy"), np.load(tmp_path / "cpp" / f"{name}.npy"))
    emulated = tmp_path / "arm"
    emulated.mkdir()
    assert main(["run", str(artifacts["npu-s"]), "--input", str(folder / "x.npy"), "--output-dir", str(emulated)]) == 0
    assert "under qemu-aarch64" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(emulated / "dequant.npy"), np.load(tmp_path / "python" / "dequant.npy"))
    assert main(["run", str(artifacts["x86_64"]), "--input", f"y={folder / 'x.npy'}", "--output-dir", str(tmp_path)]) == 1
    assert "names ['y'] are unknown and ['x'] missing" in capsys.readouterr().err


def test_edgeq_run_creates_the_output_folder(models, edgeq_run, tmp_path):
    _, artifacts, _, folder = models
    for runtime in ("python", "cpp"):
        out = tmp_path / runtime / "new" / "out"
        assert main(["run", str(artifacts["x86_64"]), "--input", str(folder / "x.npy"), "--output-dir", str(out), "--runtime", runtime]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["dequant.npy", "dequant_map.npy"]
    out = tmp_path / "edgeq-run" / "new"
    completed = run_cli([str(edgeq_run["x86_64"])], str(artifacts["x86_64"]), "--input", str(folder / "x.npy"), "--output-dir", str(out))
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dequant.npy", "dequant_map.npy"]


def test_an_output_folder_that_cannot_be_created_is_refused(models, edgeq_run, tmp_path, capsys):
    _, artifacts, _, folder = models
    in_the_way = tmp_path / "results"
    in_the_way.write_text("a file, not a folder")
    for out in (in_the_way, in_the_way / "run1"):
        expected = f"{out}: cannot create the folder: {in_the_way} is a file, not a folder"
        for runtime in ("python", "cpp"):
            assert main(["run", str(artifacts["x86_64"]), "--input", str(folder / "x.npy"), "--output-dir", str(out), "--runtime", runtime]) == 1
            assert f"edgeq run: error: {expected}" in capsys.readouterr().err
        completed = run_cli([str(edgeq_run["x86_64"])], str(artifacts["x86_64"]), "--input", str(folder / "x.npy"), "--output-dir", str(out))
        assert completed.returncode == 1 and completed.stderr.strip() == f"edgeq-run: error: {expected}"


def test_edgeq_run_needs_neither_torch_nor_the_tvm_compiler(models, tmp_path):
    _, artifacts, _, folder = models
    script = f"""
import sys
for name in ("torch", "onnx", "onnxruntime", "tvm"):
    sys.modules[name] = None  # any import of these now fails
from edgeq.cli import main
sys.exit(main(["run", {str(artifacts["x86_64"])!r}, "--input", {str(folder / "x.npy")!r}, "--output-dir", {str(tmp_path)!r}]))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["dequant.npy", "dequant_map.npy"]


def test_edgeq_run_explains_missing_tools(models, tmp_path, monkeypatch, capsys):
    import shutil

    _, artifacts, _, folder = models
    monkeypatch.setenv("EDGEQ_RUN_X86_64", str(tmp_path / "absent-edgeq-run"))
    assert main(["run", str(artifacts["x86_64"]), "--input", str(folder / "x.npy"), "--output-dir", str(tmp_path), "--runtime", "cpp"]) == 1
    assert "the x86_64 C++ runtime is not built" in capsys.readouterr().err
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name.startswith("qemu") else real_which(name))
    assert main(["run", str(artifacts["npu-s"]), "--input", str(folder / "x.npy"), "--output-dir", str(tmp_path)]) == 1
    assert "needs qemu-aarch64 (Debian: apt-get install qemu-user)" in capsys.readouterr().err
