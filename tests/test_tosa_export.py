"""TOSA export: the TOSA reference model computes exactly the integer model's numbers, Vela compiles what is written,
and bad inputs are clear errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from ethos_u import assert_reference_equals
from models import DataMovement, SmallCNN, integer_model
from torch import nn

from edgeq.check import check_model, check_qdq
from edgeq.errors import ExportError
from edgeq.export import load_onnx, save_torchscript, to_onnx
from edgeq.export.onnx_nodes import node_name
from edgeq.export.onnx_writer import ROUNDING_METADATA_KEY
from edgeq.export.qdq_graph import QDQGraph
from edgeq.export.tosa import build_tosa, to_tosa, tosa_graph
from edgeq.export.tosa.forms import TOSA_FORMS
from edgeq.export.tosa.reference import run_reference
from edgeq.numerics import quantize
from edgeq.ops import Op
from edgeq.quantization import DeQuantStub, QuantStub, convert_fx, default_calib_int32_output_qconfig, default_calib_qconfig
from edgeq.quantization.calibrate import calibrate as calibrate_model

ROOT = Path(__file__).resolve().parents[1]


TARGET = "ethos-u65-256"
"""The Ethos-U target the models are quantized for (its arithmetic rounds half up, as TOSA's RESCALE)."""


def target_file(folder: Path, **quantization: str) -> Path:
    """ethos-u65-256 as a target file of another name (``ethos-u65-256-file``), with ``quantization`` keys changed."""
    text = (ROOT / "targets" / f"{TARGET}.toml").read_text().replace(f'name = "{TARGET}"', f'name = "{TARGET}-file"')
    for key, value in quantization.items():
        text = re.sub(rf"^{key} = .*$", f'{key} = "{value}"', text, count=1, flags=re.M)
    path = folder / f"{TARGET}-file.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def target() -> str:
    return TARGET


class TosaOps(nn.Module):
    """Every op with a TOSA form: conv (+ReLU), grouped and depthwise convs, add, mul, concat, max / average /
    global pools, nearest upsampling, chunk, slice, pad, transpose, tables, a clamp, a linear layer over the last
    of four axes, flatten + linear and matmul; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.rows = nn.Linear(4, 4)
        self.hardswish, self.gelu = nn.Hardswish(), nn.GELU()
        self.dequant = DeQuantStub()
        self.dequant_map = DeQuantStub()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(self.conv(self.quant(x)))
        b = torch.sigmoid(a) * self.hardswish(a) + a
        c = torch.cat([F.max_pool2d(b, 3, 1, 1), F.hardtanh(self.gelu(b), -0.5, 0.5)], dim=1)
        d = F.avg_pool2d(self.depthwise(F.pad(self.grouped(c)[:, :8], (0, 1, 1, 0))), 2)
        up = F.interpolate(d, scale_factor=2.0, mode="nearest")
        first, second = up.chunk(2, dim=1)
        mixed = self.rows((first * torch.tanh(second)).transpose(2, 3))
        pooled = mixed.mean((2, 3), keepdim=True)
        head = self.fc(torch.flatten(mixed + pooled, 1))
        return self.dequant(head), self.dequant_map(mixed @ mixed.transpose(2, 3))


@pytest.fixture(scope="module")
def every_form(target):
    torch.manual_seed(0)
    example = torch.randn(1, 3, 8, 8)
    return integer_model(TosaOps().eval(), example, target), example


def test_every_form_equals_the_integer_model(every_form, target, tmp_path):
    int_model, example = every_form
    graph = to_tosa(int_model, (example,), tmp_path / "ops.tosa")
    assert (tmp_path / "ops.tosa").read_bytes() == graph.flatbuffer
    assert [t.shape for t in graph.inputs] == [(1, 3, 8, 8)] and [t.perm for t in graph.inputs] == [(0, 2, 3, 1)]
    generator = torch.Generator().manual_seed(1)
    assert assert_reference_equals(int_model, graph, [torch.randn(1, 3, 8, 8, generator=generator) * 2 for _ in range(4)]) > 0


def test_the_model_uses_every_form(every_form, target):
    int_model, example = every_form
    ops = {node.record.op for node in check_model(int_model, (example,)).nodes}
    other_tables = {Op.SILU, Op.HARDSIGMOID, Op.LEAKYRELU, Op.GELU_TANH, Op.ELU}  # the same TABLE form as sigmoid's
    assert ops == {op for op in Op if op in TOSA_FORMS} - other_tables


class PowerOfTwoTies(nn.Module):
    """Requantizations that are pure rounding shifts (power-of-two scales): ties on every other value."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 16)
        self.conv = nn.Conv2d(2, 4, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        y = F.avg_pool2d(self.conv(x), 2) + F.avg_pool2d(torch.cat([x, x], 1), 2)
        return self.dequant(y.mean((2, 3), keepdim=True) + y)


def test_ties_round_half_up(tmp_path):
    path = target_file(tmp_path, scale_rule="power_of_two")
    torch.manual_seed(0)
    example = torch.randn(1, 2, 8, 8)
    int_model = integer_model(PowerOfTwoTies().eval(), example, str(path))
    graph = tosa_graph(int_model, (example,))
    # odd sums of 2x2 windows and odd pixels: every average and every add is a tie
    odd = torch.arange(-7, 9, dtype=torch.float32).repeat(8)[: 2 * 64].reshape(1, 2, 8, 8) * 2 + 1
    assert_reference_equals(int_model, graph, [odd / 16, -odd / 16, torch.randn(1, 2, 8, 8)])


def test_a_run_of_ops_is_a_graph(every_form, target, tmp_path):
    """compile's NPU regions: any run of ops, its border tensors the ones read from or read outside it."""
    int_model, example = every_form
    qdq = load_onnx(to_onnx(int_model, (example,), tmp_path / "ops.onnx"))
    ops = [node_name(n) for n in QDQGraph(qdq).ops]
    graph = build_tosa(qdq, ops[2:5])
    assert len(graph.inputs) >= 1 and len(graph.outputs) >= 1
    assert {t.source for t in graph.inputs}.isdisjoint({t.source for t in graph.outputs})
    with pytest.raises(ExportError, match="no op named 'missing'"):
        build_tosa(qdq, ["missing"])


def test_uneven_padding_is_read_from_the_file(every_form, target, tmp_path):
    """A window padded unevenly in the file (the stride-2 depthwise conv's last row of padding, which no window
    reads, left off): its settings keep each side, and its TOSA form computes the integer model's numbers."""
    int_model, example = every_form
    model = onnx.load(to_onnx(int_model, (example,), tmp_path / "ops.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and any(a.name == "strides" and list(a.ints) == [2, 2] for a in n.attribute))
    next(a for a in conv.attribute if a.name == "pads").ints[:] = [1, 1, 0, 0]
    onnx.save(model, tmp_path / "uneven.onnx")
    qdq = load_onnx(tmp_path / "uneven.onnx")
    settings = next(n.record.attrs for n in check_qdq(qdq).nodes if n.record.name == node_name(conv))
    assert (settings.padding, settings.uneven_padding, settings.pads) == ((1, 1), (1, 1, 0, 0), (1, 1, 0, 0))
    assert settings.to_json()["uneven_padding"] == [1, 1, 0, 0]
    generator = torch.Generator().manual_seed(2)
    assert assert_reference_equals(int_model, build_tosa(qdq), [torch.randn(1, 3, 8, 8, generator=generator) * 2 for _ in range(2)]) > 0


# ---- Vela ----------------------------------------------------------------------------------------------------------

ACCELERATORS = ("ethos-u55-128", "ethos-u65-256", "ethos-u85-256")


def vela(path: Path, accelerator: str, output: Path) -> None:
    """Assert that Vela compiles a TOSA file for ``accelerator`` with every operator on the NPU (TOSA input has no
    CPU fallback: an op it cannot run is an error)."""
    command = [str(Path(sys.executable).parent / "vela"), "--accelerator-config", accelerator, str(path), "--output-dir", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode == 0 and "CPU operators = 0 (0.0%)" in done.stdout, (accelerator, done.stdout[-2000:], done.stderr[-2000:])
    assert (output / f"{path.stem}_vela.tflite").is_file()


@pytest.mark.flow
@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_vela_compiles_every_form(every_form, target, tmp_path, accelerator):
    int_model, example = every_form
    to_tosa(int_model, (example,), tmp_path / "ops.tosa")
    vela(tmp_path / "ops.tosa", accelerator, tmp_path / "out")


@pytest.mark.flow
def test_digits_cnn(target, tmp_path):
    """The digits CNN (SmallCNN with the int32 classifier of examples/digits_qat.py): reference model == integer
    model on random inputs; Vela compiles it for every accelerator."""
    torch.manual_seed(0)
    example = torch.rand(1, 1, 8, 8) * 2 - 1
    int32_head = {"": default_calib_qconfig, "module_name": {"fc": default_calib_int32_output_qconfig}}
    int_model = integer_model(SmallCNN().eval(), example, target, qconfig=int32_head)
    graph = to_tosa(int_model, (example,), tmp_path / "digits.tosa")
    assert [t.dtype for t in graph.outputs] == ["int32"]
    generator = torch.Generator().manual_seed(2)
    assert_reference_equals(int_model, graph, [torch.rand(1, 1, 8, 8, generator=generator) * 2 - 1 for _ in range(8)])
    for accelerator in ACCELERATORS:
        vela(tmp_path / "digits.tosa", accelerator, tmp_path / accelerator)


class Upsample(nn.Module):
    """Nearest upsampling by ``factor`` of an odd-sized map."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.quant, self.dequant = QuantStub(), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(F.interpolate(self.quant(x), scale_factor=float(self.factor), mode="nearest"))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_nearest_upsampling(target, tmp_path, factor):
    """RESIZE's nearest source of ``(2i + 1 - f) / 2f`` is ``i // f`` for every factor Vela takes (2x to 8x); Vela
    runs it on the NPU of each Ethos-U (the U55 and U65 included)."""
    example = torch.randn(1, 4, 5, 3)
    int_model = integer_model(Upsample(factor).eval(), example, target)
    graph = to_tosa(int_model, (example,), tmp_path / "up.tosa")
    assert_reference_equals(int_model, graph, [example, -example])
    vela(tmp_path / "up.tosa", "ethos-u55-128", tmp_path / "out")


def test_data_movement(target, tmp_path):
    """tests/models.py's DataMovement (window partitions over six axes, rolls along axes and of the flattened tensor,
    unbind, narrow, split with sizes, constant indexing): reference model == integer model."""
    torch.manual_seed(0)
    example = torch.randn(2, 4, 8, 8)
    int_model = integer_model(DataMovement().eval(), example, target)
    graph = to_tosa(int_model, (example,), tmp_path / "moves.tosa")
    assert assert_reference_equals(int_model, graph, [torch.randn(2, 4, 8, 8), example]) == 2 * 2 * 7 * 20


# ---- errors --------------------------------------------------------------------------------------------------------


def test_a_target_that_rounds_half_to_even_is_refused(tmp_path):
    torch.manual_seed(0)
    example = torch.randn(1, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, "npu-m")
    with pytest.raises(ExportError, match="quantized for 'npu-m', its integers round half_to_even; TOSA's RESCALE rounds half_up"):
        to_tosa(int_model, (example,), tmp_path / "m.tosa")
    assert not (tmp_path / "m.tosa").exists()


def test_a_file_is_read_by_its_rounding_rule(tmp_path):
    """A file records its rounding rule (``edgeq.rounding``): a target file needs no naming; a file without the
    record (another tool's QDQ file) rounds half to even, as QuantizeLinear, and is refused."""
    torch.manual_seed(0)
    example = torch.randn(1, 1, 8, 8)
    path = to_onnx(integer_model(SmallCNN().eval(), example, str(target_file(tmp_path))), (example,), tmp_path / "cnn.onnx")
    assert tosa_graph(path).outputs[0].shape == (1, 10)
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != ROUNDING_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "plain.onnx"))
    with pytest.raises(ExportError, match="plain.onnx: quantized for 'ethos-u65-256-file', its integers round half_to_even"):
        tosa_graph(tmp_path / "plain.onnx")


def test_an_op_without_a_tosa_form_is_named(target):
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(F.interpolate(self.quant(x), scale_factor=2.0, mode="bilinear"))

    example = torch.randn(1, 2, 4, 4)
    int_model = integer_model(Bilinear().eval(), example, target)
    with pytest.raises(ExportError, match=r"upsample_bilinear2d '.*Resize': has no TOSA form"):
        tosa_graph(int_model, (example,))


def test_a_slice_with_steps_is_named(target):
    class Strided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.quant(x)[:, :, ::2])

    example = torch.randn(1, 4, 6, 6)
    int_model = integer_model(Strided().eval(), example, target)
    with pytest.raises(ExportError, match=r"slice '.*Slice': a slice with steps \[2\] has no TOSA form \(allowed: 1\)"):
        tosa_graph(int_model, (example,))


def test_a_float_model_is_refused():
    with pytest.raises(ExportError, match="is not quantized"):
        tosa_graph(SmallCNN(), (torch.randn(1, 1, 8, 8),))


def test_command_line(every_form, target, tmp_path):
    from edgeq.cli import main

    int_model, example = every_form
    model = save_torchscript(int_model, (example,), tmp_path / "int_model.pt")
    assert main(["export", str(model), "--format", "tosa", "-o", str(tmp_path / "m.tosa")]) == 0
    assert (tmp_path / "m.tosa").read_bytes() == tosa_graph(int_model, (example,)).flatbuffer
    other = save_torchscript(integer_model(SmallCNN().eval(), torch.randn(1, 1, 8, 8), "npu-m"), (torch.randn(1, 1, 8, 8),), tmp_path / "m.pt")
    assert main(["export", str(other), "--format", "tosa", "-o", str(tmp_path / "n.tosa")]) != 0
    assert not (tmp_path / "n.tosa").exists()


class TwoInputs(nn.Module):
    """Two inputs read in the other order than declared, two outputs made in the other order than returned."""

    def __init__(self) -> None:
        super().__init__()
        self.quant_a, self.quant_b = QuantStub(), QuantStub()
        self.conv = nn.Conv2d(2, 2, 1)
        self.dequant_a, self.dequant_b = DeQuantStub(), DeQuantStub()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        second = self.conv(self.quant_b(b))
        first = torch.sigmoid(self.quant_a(a))
        return self.dequant_a(first + second), self.dequant_b(second)


def test_inputs_and_outputs_in_the_model_order(target):
    torch.manual_seed(0)
    examples = (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4))
    prepared = calibrate_model(TwoInputs(), [examples] * 2, example_inputs=examples, target=target)
    int_model = convert_fx(prepared)
    graph = tosa_graph(int_model, examples)
    assert [t.source for t in graph.inputs] == ["quant_a.q", "quant_b.q"]
    expected = int_model.run_integer(*examples)
    scales = [int_model.graph_module.quant_a.output_scale, int_model.graph_module.quant_b.output_scale]
    got = run_reference(graph, [quantize(x, s).numpy() for x, s in zip(examples, scales)])
    assert len(got) == 2
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want.numpy())
