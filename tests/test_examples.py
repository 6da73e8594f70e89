"""The examples run end to end and keep their promises."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_example
from torch import nn

from edgeq.ops import Op
from edgeq.quantization.qat_modules import LookupTableActivation

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.flow
def test_digits_staged_flow(tmp_path):
    """float -> calib -> qat -> int_infer -> compile on real data: the integer model within 1.0 point of the float
    model, and the compiled artifact exactly as accurate as the integer model."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_qat.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr
    accuracy = json.loads((tmp_path / "accuracy.json").read_text())
    assert accuracy["float"] > 95.0
    assert abs(accuracy["int_infer"] - accuracy["float"]) <= 1.0
    assert accuracy["int_infer_raw_pixels"] == accuracy["int_infer"]  # pixel - 128 as int8 is the same input
    assert accuracy["compile"] == accuracy["int_infer"]
    for stage in ("float", "calib", "qat"):
        assert (tmp_path / f"{stage}-checkpoint.pt").exists()
    for artifact in ("int_model.pt", "model.onnx", "digits.edgeq", "digits-x86_64.edgeq", "perf/report.json", "perf/report.html", "model.svg"):
        assert (tmp_path / artifact).exists()
    assert "integer model vs float" in result.stdout
    assert "digits-x86_64.edgeq with the Python runtime equals the integer model on all 540 test images: True" in result.stdout
    assert "digits-x86_64.edgeq with the C++ runtime equals the integer model: True" in result.stdout
    assert "digits.edgeq with the C++ runtime under qemu equals the integer model: True" in result.stdout
    assert 'id="accuracy-table"' in (tmp_path / "perf" / "report.html").read_text()


@pytest.mark.flow
@pytest.mark.filterwarnings("error::edgeq.quantization.prepare.FloatFallbackWarning")
@pytest.mark.parametrize("target", ["npu-s", "npu-m"])
@pytest.mark.parametrize("network", ["se", "pads"])
def test_digits_variants_keep_float_accuracy(network, target, tmp_path, digits_float_stage):
    """QAT on real data, every op integer (no float fallback): the integer model within 1.0 point of the float model.
    ``--model se``: Hardswish, SiLU and squeeze-and-excitation; ``--model pads``: zero pads (``nn.ZeroPad2d``,
    ``F.pad``), one ``nn.SiLU`` instance at five places, a linear layer with BatchNorm1d (folded). Stages float ->
    int_infer (the float stage trained once for both targets); the compile stage's promises are
    test_digits_staged_flow's."""
    digits = load_example("digits_qat")
    float_stage = digits_float_stage(network)
    float_stage.continue_in(tmp_path)
    results: dict[str, float] = {"float": float_stage.accuracy}
    for stage in ("calib", "qat", "int_infer"):
        digits.run_stage(stage, tmp_path, target, float_stage.data, results, network=network)
    if network == "pads":  # the ops it is there for, integer
        qat = digits.qat_model(tmp_path, target, network)
        modules = [qat.get_submodule(n.target) if n.op == "call_module" else n.target for n in qat.graph.nodes]
        assert sum(isinstance(m, nn.ZeroPad2d) or m is F.pad for m in modules) == 4
        assert [m.op for m in modules if isinstance(m, LookupTableActivation)] == [Op.SILU] * 5
        assert isinstance(qat.get_submodule("hidden.0").bn, nn.BatchNorm1d)
    assert results["float"] > 95.0
    assert abs(results["int_infer"] - results["float"]) <= 1.0



@pytest.mark.flow
def test_digits_in_two_processes(tmp_path, digits_float_stage, monkeypatch):
    """``--nproc 2``: calib and qat in two gloo processes with DistributedDataParallel. The calibration checkpoint
    equals the single process's bit for bit (each process takes every other image of each batch: the union is the
    single process's batch); the integer model's accuracy is within 1 point of the single process's."""
    monkeypatch.syspath_prepend(str(REPO / "examples"))  # the spawned processes import the example by name
    digits = load_example("digits_qat")
    float_stage = digits_float_stage("cnn")
    results: dict[int, dict[str, float]] = {}
    for nproc in (1, 2):
        workdir = tmp_path / f"nproc{nproc}"
        workdir.mkdir()
        float_stage.continue_in(workdir)
        results[nproc] = {"float": float_stage.accuracy}
        for stage in ("calib", "qat", "int_infer"):
            digits.run_stage(stage, workdir, "npu-s", float_stage.data, results[nproc], nproc=nproc)
    calibrated = [torch.load(tmp_path / f"nproc{nproc}" / "calib-checkpoint.pt") for nproc in (1, 2)]
    assert calibrated[0].keys() == calibrated[1].keys()
    for key, value in calibrated[0].items():
        assert torch.equal(value, calibrated[1][key]), key
    assert abs(results[2]["int_infer"] - results[1]["int_infer"]) <= 1.0


@pytest.mark.flow
@pytest.mark.parametrize("target", ["ethos-u65-256", "ethos-u55-128"])
def test_digits_on_ethos_u(target, tmp_path, digits_float_stage):
    """The example's compile stage, as a program, on an Arm Ethos-U target (stages calib -> int_infer in this
    process from the session's float stage): model.tosa written, the TOSA reference model equal to the integer
    model on all 540 test images, Vela's estimate of each NPU region, every artifact equal to the integer model; the
    U65's aarch64 board artifact under qemu, none for the U55 (its host runs your firmware). The reference model's
    logits are checked here against the artifact run by the Python runtime, so the printed equality came from a
    real run of the reference model."""
    from edgeq_runtime import Model

    digits = load_example("digits_qat")
    float_stage = digits_float_stage("cnn")
    float_stage.continue_in(tmp_path)
    results: dict[str, float] = {"float": float_stage.accuracy}
    for stage in ("calib", "qat", "int_infer"):
        digits.run_stage(stage, tmp_path, target, float_stage.data, results)
    (tmp_path / "accuracy.json").write_text(json.dumps(results))
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "digits_qat.py"), "--stage", "compile", "--target", target, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "the integer model equals the TOSA reference model on all 540 test images: True" in out
    assert "digits-x86_64.edgeq with the Python runtime equals the integer model on all 540 test images: True" in out
    assert "digits-x86_64.edgeq with the C++ runtime equals the integer model: True" in out
    vela_line = rf"vela: region\d+_npu \(\d+ ops?\) on {target}: (\d+) NPU cycles \(\d+ with memory access\), ([\d.]+) ms at \d+ MHz, SRAM ([\d.]+) KiB"
    estimates = re.findall(vela_line, out)
    assert estimates and all(int(cycles) > 0 and float(ms) > 0 for cycles, ms, _ in estimates), out
    board = tmp_path / "digits.edgeq"
    if target == "ethos-u65-256":
        assert "digits.edgeq with the C++ runtime under qemu equals the integer model: True" in out and board.is_file()
    else:
        assert "no board library: ethos-u55-128's host is a Cortex-M55 running your firmware" in out and not board.exists()

    assert (tmp_path / "model.tosa").read_bytes()[4:8] == b"TOSA"  # the flatbuffer's file identifier
    reference = np.load(tmp_path / "tosa-reference.npy")
    test_x, test_y = float_stage.data[2], float_stage.data[3]
    assert reference.shape == (540, 10) and reference.dtype == np.int32 and len(np.unique(reference)) > 100
    with Model.load(tmp_path / "digits-x86_64.edgeq") as model:
        (output,) = model.outputs
        artifact = np.concatenate([model.run(digits.raw_pixels(x[None]).numpy(), raw=True)[output.name] for x in test_x])
    np.testing.assert_array_equal(reference, artifact)
    accuracy = 100.0 * float((reference.argmax(1) == test_y.numpy()).mean())
    assert accuracy == pytest.approx(results["int_infer"]) and accuracy > 95.0


def _tutorial_region(text: str) -> str:
    """The lines between ``# tutorial: start`` and ``# tutorial: end`` of the example."""
    return text.split("# tutorial: start\n", 1)[1].split("# tutorial: end\n", 1)[0]


def test_readme_tutorial_is_the_example():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- tutorial: examples/deploy_torchvision.py -->\n```python\n", 1)[1].split("```\n", 1)[0]
    assert block == _tutorial_region((REPO / "examples" / "deploy_torchvision.py").read_text(encoding="utf-8"))


@pytest.mark.flow
@pytest.mark.slow
def test_torchvision_tutorial(tmp_path):
    """The tutorial at 32x32: the artifact runs, equals the integer model on non-constant logits, and is timed."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "deploy_torchvision.py"), "--size", "32", "--out", str(tmp_path / "new")],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "runs on the x86_64 CPU" and (tmp_path / "new" / "model.edgeq").is_file()
    same = re.search(r"the artifact equals the integer model: True \(1000 int8 logits from (-?\d+) to (-?\d+)\)", result.stdout)
    assert same and int(same[1]) < int(same[2]), result.stdout
    assert re.search(r"latency over 20 runs on \d+ thread\(s\): median [\d.]+ ms", lines[-1])
