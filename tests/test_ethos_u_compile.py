"""Compiling for the Arm Ethos-U targets: every NPU region written as TOSA and compiled by Vela into the artifact
(members named in the manifest), which both runtimes run as the bit-exact simulation, equal to the integer model (the
digits CNN's TOSA graph in the TOSA reference model too);
the command stream's need of the device said once; check's NPU placement is what Vela compiled; a region Vela
refuses is one clear error and no artifact."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ethos_u import DEVICE_LINE, assert_equal, assert_reference_equals, assert_vela_compiled_every_npu_region, expected, python_outputs
from models import BatchNorms1d, Pads, WideStride, integer_model, rewrite_artifact, with_batchnorm_statistics
from torch import nn

from edgeq.check.report import Placement
from edgeq.compile import compile_model
from edgeq.errors import CompileError
from edgeq.export.tosa import tosa_graph
from edgeq.quantization import DeQuantStub, QuantStub
from edgeq.run import run_artifact
from edgeq.targets import load_target
from edgeq.vela_configs import vela_version
from edgeq_runtime import ArtifactError, CommandStreamWarning, Model

pytestmark = pytest.mark.flow  # compiles with TVM and Vela, builds the C++ runtime, runs aarch64 under qemu

REPO = Path(__file__).resolve().parent.parent
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
TARGETS = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")
LINUX_HOSTS = ("ethos-u65-256", "ethos-u85-256")
"""The targets whose NPU sits beside an aarch64 Linux host (the U55's host is a Cortex-M55 running firmware)."""
QUANTIZED_FOR = "ethos-u65-256"
"""The models are quantized once, for this target: the three share their quantization rules (asserted)."""


class ResizeBetweenConvs(nn.Module):
    """Convolutions around a bilinear resize, which the Ethos-U targets leave to the host: NPU, CPU, NPU."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.first(self.quant(x)))
        return self.dequant(self.second(F.interpolate(a, scale_factor=2, mode="bilinear")))


@pytest.fixture(scope="module")
def edgeq_run(cpp_build) -> dict[str, Path]:
    """The C++ runtime for x86_64 and aarch64 (:func:`conftest.cpp_build`)."""
    return {variant: cpp_build / variant / "edgeq-run" for variant in ("x86_64", "aarch64")}


@pytest.fixture(scope="module")
def digits(digits_integer_models):
    """The digits CNN through the example's float -> calib -> qat stages for an Ethos-U target, and 16 test images."""
    int_model, pixels = digits_integer_models(QUANTIZED_FOR)
    return int_model, (pixels[:16].to(torch.float32) - 128) / 128


@pytest.fixture(scope="module")
def fallback():
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    return integer_model(ResizeBetweenConvs().eval(), example, QUANTIZED_FOR), torch.randn(2, 3, 8, 8)


def test_the_targets_share_the_quantization_rules():
    rules = {name: load_target(name).quantization for name in TARGETS}
    assert all(rule == rules[QUANTIZED_FOR] for rule in rules.values())


# ---- what the artifact holds -----------------------------------------------------------------------------------------


def cpp_outputs(command: list[str], artifact: Path, x: torch.Tensor, folder: Path) -> list[np.ndarray]:
    """The raw outputs of edgeq-run, which says once on stderr that the command stream needs the device."""
    folder.mkdir()
    np.save(folder / "x.npy", x.numpy())
    args = [str(artifact), "--input", str(folder / "x.npy"), "--output-dir", str(folder), "--raw"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(DEVICE_LINE) == 1, done.stderr
    with zipfile.ZipFile(artifact) as archive:
        outputs = json.loads(archive.read("manifest.json"))["outputs"]
    return [np.load(folder / f"{output['file']}.npy") for output in outputs]


# ---- the digits CNN on each target -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_digits_cnn(digits, edgeq_run, target, tmp_path):
    """Wholly on the NPU (two regions: the int32 classifier head is one of its own); built for this machine (the
    simulation) and run by both runtimes == the integer model."""
    int_model, x = digits
    result = compile_model(int_model, (x,), target=target, out=tmp_path / "digits.edgeq", simulate=True)
    assert [r.placement for r in result.partition.regions] == [Placement.NPU, Placement.NPU]
    assert result.manifest["outputs"][0]["dtype"] == "int32"
    assert_vela_compiled_every_npu_region(result, target)
    want = expected(int_model, x)
    assert_equal(python_outputs(result.artifact, x), want)
    assert_equal(cpp_outputs([str(edgeq_run["x86_64"])], result.artifact, x, tmp_path / "cpp"), want)


def test_digits_cnn_tosa_reference_model(digits):
    """The digits CNN's TOSA graph (of the one integer model test_digits_cnn compiles for each target) run by the TOSA
    reference model == the integer model on the 16 test images."""
    int_model, x = digits
    assert assert_reference_equals(int_model, tosa_graph(int_model, (x,)), [x]) > 0


def test_u55_library_is_the_simulation_for_this_machine(digits, tmp_path):
    """The U55's host is a Cortex-M55 running the user's firmware: without --simulate, the library is still built
    for this machine, and compile says what it is for."""
    int_model, x = digits
    result = compile_model(int_model, (x[:1],), target="ethos-u55-128", out=tmp_path / "u55.edgeq")
    here = {"arm64": "aarch64"}.get(platform.machine(), platform.machine())
    assert result.arch == result.manifest["library"]["arch"] == here
    lines = "\n".join(result.summary_lines())
    assert "host library: the bit-exact simulation only" in lines and "Cortex-M55 runs your firmware" in lines
    assert f"Vela {vela_version()}: 2 NPU region(s) compiled to command streams for ethos-u55-128" in lines


@pytest.mark.parametrize("target", TARGETS)
def test_pads_run_on_the_npu(target, tmp_path):
    """Every spelling of a pad with zeros (tests/models.py's Pads) is a TOSA PAD Vela compiles: the whole model on
    the NPU, its simulation == the integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 7, 7)
    int_model = integer_model(Pads().eval(), example, QUANTIZED_FOR)
    result = compile_model(int_model, (example,), target=target, out=tmp_path / "pads.edgeq", simulate=True)
    pads = [n for n in result.report.nodes if n.record.op == "pad"]
    assert len(pads) == 6 and {n.placement for n in pads} == {Placement.NPU}
    assert [r.placement for r in result.partition.regions] == [Placement.NPU]
    assert_vela_compiled_every_npu_region(result, target)
    x = torch.randn(2, 4, 7, 7)
    assert_equal(python_outputs(result.artifact, x), expected(int_model, x))


@pytest.mark.parametrize("target", TARGETS)
def test_batchnorm1d_runs_on_the_npu(target, tmp_path):
    """BatchNorm1d folded into linear layers and alone (tests/models.py's BatchNorms1d: TOSA depthwise convs between
    reshapes) is wholly on the NPU, Vela compiles it, and both the TOSA reference model and the simulation equal the
    integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 6)
    int_model = integer_model(with_batchnorm_statistics(BatchNorms1d(), (8, 4, 6)), example, QUANTIZED_FOR)
    result = compile_model(int_model, (example,), target=target, out=tmp_path / "norms.edgeq", simulate=True)
    assert [r.placement for r in result.partition.regions] == [Placement.NPU]
    assert_vela_compiled_every_npu_region(result, target)
    x = torch.randn(2, 4, 6)
    assert assert_reference_equals(int_model, tosa_graph(int_model, (example,)), [x]) == 20
    assert_equal(python_outputs(result.artifact, x), expected(int_model, x))


# ---- CPU fallback --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", LINUX_HOSTS)
def test_cpu_fallback(fallback, edgeq_run, target, tmp_path):
    """The bilinear resize on the aarch64 host between two Vela-compiled NPU regions: the simulated build in both
    runtimes, and the aarch64 build in the C++ runtime under qemu, == the integer model."""
    int_model, x = fallback
    simulated = compile_model(int_model, (x,), target=target, out=tmp_path / "sim.edgeq", simulate=True)
    assert [r.placement for r in simulated.partition.regions] == [Placement.NPU, Placement.CPU, Placement.NPU]
    assert_vela_compiled_every_npu_region(simulated, target)
    want = expected(int_model, x)
    assert_equal(python_outputs(simulated.artifact, x), want)
    assert_equal(cpp_outputs([str(edgeq_run["x86_64"])], simulated.artifact, x, tmp_path / "x86_64"), want)
    board = compile_model(int_model, (x,), target=target, out=tmp_path / "board.edgeq")
    assert board.manifest["library"]["arch"] == "aarch64"
    assert_vela_compiled_every_npu_region(board, target)
    assert_equal(cpp_outputs([*QEMU, str(edgeq_run["aarch64"])], board.artifact, x, tmp_path / "aarch64"), want)


def test_cpu_fallback_is_refused_on_the_u55(fallback, tmp_path):
    """No host code for the Cortex-M55: the resize is unsupported, named, and nothing is written."""
    int_model, x = fallback
    with pytest.raises(CompileError, match=r"^Resize 'upsample/Resize' cannot run on ethos-u55-128: .*host is a Cortex-M55"):
        compile_model(int_model, (x,), target="ethos-u55-128", out=tmp_path / "u55.edgeq")
    assert not (tmp_path / "u55.edgeq").exists()


# ---- Vela's refusals ------------------------------------------------------------------------------------------------


def test_a_region_vela_refuses_is_one_error_and_no_artifact(tmp_path):
    """A target file of the user's that lets strides of 4 onto the NPU: check places the padded stride-4 conv
    there, Vela refuses it; the error names the region, the op and Vela's reason, and nothing is written."""
    text = (REPO / "targets" / "ethos-u65-256.toml").read_text().replace('name = "ethos-u65-256"', 'name = "ethos-u65-wide"')
    text, count = re.subn(r"(\[npu\.conv2d\][^\[]*?)max_stride = 3", r"\1max_stride = 4", text)
    assert count == 1
    target = tmp_path / "ethos-u65-wide.toml"
    target.write_text(text)
    torch.manual_seed(0)
    example = torch.randn(1, 3, 16, 16)
    int_model = integer_model(WideStride().eval(), example, str(target))
    message = "region0_npu: Vela refuses op 'wide/Conv' (Conv2D): Non-passthrough operation (Conv2D) could not run on NPU"
    with pytest.raises(CompileError) as refused:
        compile_model(int_model, (example,), target=target, out=tmp_path / "wide.edgeq", simulate=True)
    assert str(refused.value) == message
    assert not (tmp_path / "wide.edgeq").exists()


# ---- running it --------------------------------------------------------------------------------------------------


def test_edgeq_run_says_once_that_the_command_stream_needs_the_device(digits, u65_artifact, tmp_path):
    int_model, x = digits
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CommandStreamWarning)  # edgeq run says it as a line, not as a warning too
        run = run_artifact(u65_artifact, [str(u65_artifact.parent / "x.npy")], tmp_path / "out", raw=True, say=said.append)
    assert sum(DEVICE_LINE in line for line in said) == 1, said
    assert "NPU target ethos-u65-256: the command streams of region0_npu, region1_npu need the NPU itself" in "\n".join(said)
    np.testing.assert_array_equal(np.load(run.outputs["dequant"]), expected(int_model, x[:1])[0])


def _streams(manifest: dict) -> list[dict]:
    return manifest["npu_command_streams"]


BAD_MANIFESTS = {
    "streams in version 2": (lambda m, _: m.__setitem__("schema_version", 2), "npu_command_streams needs schema version 3; got 2"),
    "member not in the artifact": (lambda m, _: _streams(m)[0].__setitem__("weights", "nope.weights"),
                                   'npu_command_streams[0].weights must name one of the members; got "nope.weights"'),
    "member named twice": (lambda m, _: _streams(m)[0].__setitem__("estimate", _streams(m)[0]["tosa"]),
                           'npu_command_streams[0].estimate repeats npu_command_streams[0].tosa ("region0_npu.tosa")'),
    "unknown key": (lambda m, _: _streams(m)[0].__setitem__("extra", 1),
                    "npu_command_streams[0].extra is not a known key (known: region, compiler, compiler_version, options, ops, "
                    "tosa, command_stream, weights, estimate, memory)"),
    "another compiler": (lambda m, _: _streams(m)[0].__setitem__("compiler", "other"),
                         'npu_command_streams[0].compiler must be "vela"; got "other"'),
    "negative size": (lambda m, _: _streams(m)[0]["memory"].__setitem__("sram_bytes", -1),
                      "npu_command_streams[0].memory.sram_bytes must be an integer >= 0; got -1"),
    "no ops": (lambda m, _: _streams(m)[0].__setitem__("ops", []), "npu_command_streams[0].ops must be a list of 1 or more op names; got []"),
    "no streams": (lambda m, _: m.__setitem__("npu_command_streams", []), "npu_command_streams must be a list of 1 or more command streams; got []"),
}


@pytest.fixture(scope="module")
def u65_artifact(digits, tmp_path_factory) -> Path:
    """The digits CNN compiled for ethos-u65-256 (simulated) at a batch of one."""
    int_model, x = digits
    folder = tmp_path_factory.mktemp("u65")
    np.save(folder / "x.npy", x[:1].numpy())
    return compile_model(int_model, (x[:1],), target="ethos-u65-256", out=folder / "d.edgeq", simulate=True).artifact


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_command_streams_are_refused_alike_by_both_runtimes(case, u65_artifact, edgeq_run, tmp_path):
    change, problem = BAD_MANIFESTS[case]
    bad = rewrite_artifact(u65_artifact, tmp_path / "bad.edgeq", change)
    message = f"{bad}: manifest.json: {problem}"
    with pytest.raises(ArtifactError) as refused:
        Model.load(bad)
    assert str(refused.value) == message
    args = [str(bad), "--input", str(u65_artifact.parent / "x.npy"), "--output-dir", str(tmp_path)]
    done = subprocess.run([str(edgeq_run["x86_64"]), *args], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == f"edgeq-run: error: {message}", done.stderr
