"""Fixtures shared across test files."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CPP_BUILD = REPO / "runtime" / "cpp" / "build"
"""The C++ runtime's build folders: ``CPP_BUILD / variant / "edgeq-run"``."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--flow", action="store_true", help="also run the whole-flow tests (marked flow) when no test paths are given")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``pytest`` alone (the test paths of pyproject.toml, no ``-m``) runs the fast selection: the whole-flow tests
    (marked ``flow``) are deselected unless ``--flow`` is given (``./scripts/test.sh`` and CI give it). Tests named
    on the command line (a file, a node id) run whatever their marks."""
    if config.getoption("flow") or config.option.markexpr or config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return
    flow = [item for item in items if item.get_closest_marker("flow")]
    if flow:
        config.hook.pytest_deselected(items=flow)
        items[:] = [item for item in items if not item.get_closest_marker("flow")]


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """The C++ runtime built (incrementally) once per session for x86_64, x86_64 with AddressSanitizer and aarch64:
    :data:`CPP_BUILD`."""
    subprocess.run([str(REPO / "scripts" / "build_runtime.sh"), "x86_64", "x86_64-asan", "aarch64"], check=True, capture_output=True)
    return CPP_BUILD


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class DigitsFloatStage:
    """The digits example's float stage, run once per session and network: its checkpoint, the data, its test
    accuracy, and torch's random state right after it (the later stages continue from it, as in one process)."""

    checkpoint: Path
    data: tuple
    accuracy: float
    rng_state: torch.Tensor

    def continue_in(self, workdir: Path) -> None:
        """Put the float checkpoint into ``workdir`` and restore the random state the next stage starts from."""
        shutil.copyfile(self.checkpoint, workdir / "float-checkpoint.pt")
        torch.set_rng_state(self.rng_state)


@pytest.fixture(scope="session")
def digits_float_stage(tmp_path_factory) -> Callable[[str], DigitsFloatStage]:
    """The example's float stage (40 epochs, the same for every target) of ``network`` (``cnn``, ``se``, ``pads``),
    trained once per session: seed 0, the example's data, then ``run_stage("float")``."""
    digits = load_example("digits_qat")
    trained: dict[str, DigitsFloatStage] = {}

    def float_stage(network: str) -> DigitsFloatStage:
        if network not in trained:
            workdir = tmp_path_factory.mktemp(f"digits-float-{network}")
            torch.manual_seed(0)
            data = digits.load_pixels()
            results: dict[str, float] = {}
            digits.run_stage("float", workdir, "any", data, results, network=network)  # the float stage reads no target
            trained[network] = DigitsFloatStage(workdir / "float-checkpoint.pt", data, results["float"], torch.get_rng_state())
        return trained[network]

    return float_stage


@pytest.fixture(scope="session")
def digits_integer_models(tmp_path_factory, digits_float_stage):
    """The example CNN, trained through the example's float -> calib -> qat stages for ``target``, converted (once
    per target and session); with the test set's uint8 pixels."""
    digits = load_example("digits_qat")
    made: dict[str, tuple] = {}

    def for_target(target: str) -> tuple:
        if target not in made:
            workdir = tmp_path_factory.mktemp(f"digits-{target}")
            float_stage = digits_float_stage("cnn")
            float_stage.continue_in(workdir)
            data = float_stage.data
            results: dict[str, float] = {}
            for stage in ("calib", "qat"):
                digits.run_stage(stage, workdir, target, data, results)
            qat = digits.qat_model(workdir, target)
            qat.load_state_dict(torch.load(workdir / "qat-checkpoint.pt"))
            qat.eval()
            digits.set_fake_quantize(qat, digits.FakeQuantState.VALIDATION)
            made[target] = (digits.convert_fx(qat), data[2])
        return made[target]

    return for_target


@pytest.fixture(scope="session")
def digits_integer_model(digits_integer_models):
    """The example CNN through the example's stages for npu-m (:func:`digits_integer_models`)."""
    return digits_integer_models("npu-m")


@pytest.fixture(scope="session")
def functional_ops_npu_s(tmp_path_factory):
    """FunctionalOps for npu-s, compiled (simulated): NPU regions, CPU fallbacks (grouped conv, split, transpose)
    and transitions between them. (float model, integer model, a batch of 4 samples, CompileResult)."""
    from models import FunctionalOps, integer_model

    from edgeq.compile import compile_model

    torch.manual_seed(0)
    samples = torch.randn(4, 3, 8, 8)
    float_model = FunctionalOps().eval()
    int_model = integer_model(float_model, samples, "npu-s")
    artifact = tmp_path_factory.mktemp("functional_ops") / "f.edgeq"
    return float_model, int_model, samples, compile_model(int_model, (samples[:1],), out=artifact, simulate=True)


def own_x86_64_target(folder: Path, name: str, mcpu: str) -> Path:
    """targets/x86_64.toml as a user's own target file (``folder/name.toml``) for the LLVM CPU ``mcpu``."""
    text = (REPO / "targets" / "x86_64.toml").read_text()
    assert 'name = "x86_64"' in text and 'mcpu = "x86-64-v3"' in text
    path = folder / f"{name}.toml"
    path.write_text(text.replace('name = "x86_64"', f'name = "{name}"').replace('mcpu = "x86-64-v3"', f'mcpu = "{mcpu}"'))
    return path


@pytest.fixture(scope="session")
def functional_ops_artifacts(tmp_path_factory) -> Callable[[str], Path]:
    """FunctionalOps (two outputs) calibrated for x86_64 on a batch of 2 random 3x8x8 samples (seed 0), compiled
    once per session and target (the hardening tests of both runtimes and the C++ runtime's share them; none changes
    an artifact): ``artifact(target)`` for ``x86_64``, ``aarch64``, or ``zen3`` (a target file of the user's for AMD
    Zen 3: targets/x86_64.toml with LLVM mcpu znver3, which uses SSE4a, VAES and VPCLMULQDQ besides x86-64-v3's)."""
    from models import FunctionalOps, integer_model

    from edgeq.compile import compile_model

    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    int_model = integer_model(FunctionalOps().eval(), example, "x86_64")
    folder = tmp_path_factory.mktemp("functional_ops_x86_64")
    compiled: dict[str, Path] = {}

    def artifact(target: str) -> Path:
        if target not in compiled:
            where = own_x86_64_target(folder, "zen3", "znver3") if target == "zen3" else target
            compiled[target] = compile_model(int_model, (example,), target=where, out=folder / f"{target}.edgeq").artifact
        return compiled[target]

    return artifact
