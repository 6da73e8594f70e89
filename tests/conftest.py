"""Fixtures shared across test files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def digits_integer_model(tmp_path_factory):
    """The example CNN, trained through the example's float -> calib -> qat stages (npu-m), converted; with the
    test set's uint8 pixels."""
    digits = load_example("digits_qat")
    workdir = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    data = digits.load_pixels()
    results: dict[str, float] = {}
    for stage in ("float", "calib", "qat"):
        digits.run_stage(stage, workdir, "npu-m", data, results)
    qat = digits.qat_model(workdir, "npu-m")
    qat.load_state_dict(torch.load(workdir / "qat-checkpoint.pt"))
    qat.eval()
    digits.set_fake_quantize(qat, digits.FakeQuantState.VALIDATION)
    return digits.convert_fx(qat), data[2]


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
