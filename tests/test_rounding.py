"""The half_up rounding rule (docs/numerics.md section 6.1) through every layer: one table of cases computed
identically by the integer model's torch arithmetic, the Relax lowering's two forms and the numpy reference; QAT's
fake quantization; an add's TOSA form; the ONNX metadata compile checks; and a model on half_up targets (ethos-u65-256,
npu-m's file with the rule) whose integer model, reference and compiled artifact agree bit for bit and differ from
half_to_even's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import tvm
from models import calibrate
from reference import lookup_table as reference_lookup_table
from reference import quantize as reference_quantize
from reference import round_shift, run_reference
from torch import nn
from tvm import relax

from edgeq import numerics
from edgeq.compile import compile_model
from edgeq.compile.codegen import Machine, build_library
from edgeq.compile.integer_relax import requantize, rounding_rule
from edgeq.errors import CompileError, QuantizationError
from edgeq.export import save_torchscript, to_onnx
from edgeq.export.onnx_reader import load_model_file
from edgeq.ops import Op
from edgeq.quantization import DeQuantStub, QuantStub, convert_fx
from edgeq.quantization.fake_quantize import ActivationFakeQuantize
from edgeq.quantization.qat_modules import QuantizeInput
from edgeq.targets import Rounding, ScaleRule, load_target
from edgeq_runtime import Model

REPO = Path(__file__).resolve().parent.parent
HERE = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}

CASES = [
    # (acc, M, n, half_to_even, half_up): acc * M / 2**n rounded
    (-5, 2**30, 31, -2, -2),  # -2.5
    (-3, 2**30, 31, -2, -1),  # -1.5
    (-1, 2**30, 31, 0, 0),  # -0.5
    (1, 2**30, 31, 0, 1),  # 0.5
    (3, 2**30, 31, 2, 2),  # 1.5
    (5, 2**30, 31, 2, 3),  # 2.5
    (2, 1, 2, 0, 1),  # 0.5 at shift 2, the smallest half up allows
    (-2, 1, 2, 0, 0),  # -0.5
    (6, 1, 2, 2, 2),  # 1.5
    (2**30, 2**30, 61, 0, 1),  # 2**60 / 2**61: a tie at shift 61
    (-(2**31), 2**30, 62, 0, 0),  # -0.5 at shift 62
    (3 * 2**29, 2**30, 60, 2, 2),  # 1.5 at shift 60
    (-(3 * 2**29), 2**30, 60, -2, -1),  # -1.5 at shift 60
    (2**31 - 1, 2**31 - 1, 62, 1, 1),  # the largest product, 2**62 - 2**32 + 1: just below 1
    (-(2**31), 2**31 - 1, 62, -1, -1),  # the most negative one: just above -1
    (2**31 - 1, 2**31 - 1, 56, 64, 64),  # 64 - 2**-24 + 2**-56: 62 significant bits, past float64's 53
    (9110917, 1977232205, 55, 1, 1),  # 2**54 + 1: just above 0.5
    (-9110917, 1977232205, 55, -1, -1),  # just below -0.5
    (134217727, 134217729, 55, 0, 0),  # 2**54 - 1: just below 0.5 (floor(p + 1/2) in float64 gives 1)
]
RULES = {Rounding.HALF_TO_EVEN: 3, Rounding.HALF_UP: 4}
"""The column of each rule's expected result in :data:`CASES`."""


def expected(rounding: Rounding) -> np.ndarray:
    return np.array([case[RULES[rounding]] for case in CASES], np.int64)


@pytest.mark.parametrize("rounding", list(Rounding))
def test_rounding_cases_in_torch_and_numpy(rounding):
    """The integer model's arithmetic (exact int64, unsaturated) and the numpy reference give the table's values."""
    acc = torch.tensor([c[0] for c in CASES], dtype=torch.int64)
    multipliers = torch.tensor([c[1] for c in CASES], dtype=torch.int64)
    shifts = torch.tensor([c[2] for c in CASES], dtype=torch.int64)
    np.testing.assert_array_equal(numerics.requantize(acc, multipliers, shifts, rounding).numpy(), expected(rounding))
    np.testing.assert_array_equal(round_shift(acc.numpy(), multipliers.numpy(), shifts.numpy(), rounding.value), expected(rounding))


def _requantize_module(multipliers: list[numerics.FixedPointMultiplier], bounds: list[int] | None, rounding: Rounding, rows: int = 2):
    """The lowering's requantization of an int32 ``[rows, C]`` accumulator, one multiplier per channel."""
    source = relax.Var("acc", relax.TensorType([rows, len(multipliers)], "int32"))
    builder = relax.BlockBuilder()
    with rounding_rule(rounding), builder.function("main", [source]):
        with builder.dataflow():
            output = builder.emit_output(requantize(source, multipliers, 2, 1, 0, bounds))
        builder.emit_func_output(output)
    return builder.get()


def _run(module, acc: np.ndarray, tmp_path: Path) -> np.ndarray:
    library = build_library(module, Machine("x86_64", HERE, None), 2, str(tmp_path / "k.so"), lambda _: None)
    return relax.VirtualMachine(library.executable, tvm.cpu())["main"](tvm.runtime.tensor(acc)).numpy()


@pytest.mark.parametrize("rounding", list(Rounding))
def test_rounding_cases_in_relax(rounding, tmp_path):
    """The compiled kernels' int64 form gives the table's values (saturated to int8, as every kernel does), and so
    does the float64 form on the cases it proves exact (``numerics.exact_in_float64``), with the same rule; the
    rows are the accumulator and its negation."""
    multipliers = [numerics.FixedPointMultiplier(m, n) for _, m, n, *_ in CASES]
    acc = np.array([[c[0] for c in CASES], [-c[0] if c[0] > -(2**31) else c[0] for c in CASES]], np.int32)
    reference = np.clip(round_shift(acc.astype(np.int64), [c[1] for c in CASES], [c[2] for c in CASES], rounding.value), -128, 127)
    np.testing.assert_array_equal(reference[0], np.clip(expected(rounding), -128, 127))
    np.testing.assert_array_equal(_run(_requantize_module(multipliers, None, rounding), acc, tmp_path), reference)

    bounds = [abs(int(c[0])) for c in CASES]
    exact = [numerics.exact_in_float64(b * m.multiplier, m.shift, rounding) for b, m in zip(bounds, multipliers)]
    assert not exact[-1]  # floor(p + 1/2) of 2**54 - 1 over 2**55 would give 1; the int64 form gives 0
    if rounding is Rounding.HALF_UP:
        p = np.float64(134217727) * np.float64(134217729 * 2.0**-55)
        assert np.floor(p + 0.5) == 1
    chosen = [i for i, fits in enumerate(exact) if fits]
    assert len(chosen) >= 9
    module = _requantize_module([multipliers[i] for i in chosen], [bounds[i] for i in chosen], rounding)
    assert ("R.floor" in module.script()) is (rounding is Rounding.HALF_UP) and "right_shift" not in module.script()
    np.testing.assert_array_equal(_run(module, np.ascontiguousarray(acc[:, chosen]), tmp_path), reference[:, chosen])


def test_half_up_float64_form_is_exact_up_to_its_bound(tmp_path):
    """``floor(p + 1/2)`` is exact while ``bound * M + 2**(n-1) < 2**53`` (docs/numerics.md 6.1): at the largest
    accumulators of a full 31-bit multiplier (shift 52, where the half added is 2**51), on ties near them, and on
    random accumulators, equal to the int64 reference; one more accumulator would break the bound."""
    full, ties = numerics.FixedPointMultiplier(2**31 - 1, 52), numerics.FixedPointMultiplier(2**30, 50)
    bounds = [(numerics.FLOAT64_EXACT - 2**51 - 1) // full.multiplier, (numerics.FLOAT64_EXACT - 2**49 - 1) // ties.multiplier]
    for bound, m in zip(bounds, (full, ties)):
        assert numerics.exact_in_float64(bound * m.multiplier, m.shift, Rounding.HALF_UP)
        assert not numerics.exact_in_float64((bound + 1) * m.multiplier, m.shift, Rounding.HALF_UP)
    rng = np.random.default_rng(0)
    acc = np.stack([rng.integers(-b, b + 1, 64) for b in bounds], axis=1).astype(np.int32)
    acc[:4, 0] = [bounds[0], -bounds[0], bounds[0] - 1, -(bounds[0] - 1)]
    acc[:6, 1] = [13 * 2**19, -13 * 2**19, 11 * 2**19, -11 * 2**19, bounds[1], -bounds[1]]  # ties: 6.5, 5.5; the bound
    module = _requantize_module([full, ties], bounds, Rounding.HALF_UP, rows=64)
    assert "R.floor" in module.script()
    output = _run(module, acc, tmp_path)
    reference = np.clip(round_shift(acc.astype(np.int64), [full.multiplier, ties.multiplier], [full.shift, ties.shift], "half_up"), -128, 127)
    np.testing.assert_array_equal(output, reference)
    assert list(output[:4, 1]) == [7, -6, 6, -5]


def test_round_half_of_floats():
    """Float values (quantizing an input, QAT, table entries): ties up, exactly, where ``floor(x + 1/2)`` in float32
    would round ``0.5 - 2**-25`` up."""
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.5 - 2**-25, -0.5 - 2**-24, 2.0**100], dtype=torch.float32)
    assert numerics.round_half(x, Rounding.HALF_UP).tolist() == [-2, -1, 0, 1, 2, 3, 0, -1, 2.0**100]
    assert numerics.round_half(x, Rounding.HALF_TO_EVEN).tolist() == [-2, -2, -0.0, 0, 2, 2, 0, -1, 2.0**100]
    assert torch.floor(x[6] + 0.5) == 1  # what the exact form avoids
    values = torch.from_numpy(np.random.default_rng(0).normal(0, 3, 5000).astype(np.float32))
    for scale in (0.5, 0.0371, 1 / 128):
        np.testing.assert_array_equal(
            numerics.quantize(values, scale, Rounding.HALF_UP).numpy(), reference_quantize(values.numpy(), scale, "half_up")
        )


def test_half_up_add_multipliers_have_an_exact_tosa_form():
    """An add's multipliers under half up share one shift with the largest in ``[2**22, 2**23)``, so that
    ``128 * (M_a + M_b) < 2**31``; TOSA's RESCALE int8 -> int32 by ``4 * M`` with shift 2 is exact, the int32 ADD
    cannot overflow, and RESCALE by 1 with shift n rounds the sum as the integer model does."""
    (ma, mb), shift = numerics.add_multipliers([0.7, 0.2], what="add", rounding=Rounding.HALF_UP)
    assert 2**22 <= ma < 2**23 and 128 * (ma + mb) < 2**31 and shift == 23
    assert numerics.add_multipliers([0.7, 0.2], what="add")[0][0] >= 2**30  # half to even: 31 bits, as before
    a, b = (torch.arange(-128, 128, dtype=torch.int64).reshape(-1, 1), torch.arange(-128, 128, dtype=torch.int64).reshape(1, -1))
    rescaled_a, rescaled_b = ((4 * v * m + 2) >> 2 for v, m in ((a, ma), (b, mb)))  # SINGLE_ROUND with shift 2
    assert torch.equal(rescaled_a, a * ma) and torch.equal(rescaled_b, b * mb)
    assert int((rescaled_a.abs() + rescaled_b.abs()).max()) < 2**31
    tosa = (rescaled_a + rescaled_b + (1 << (shift - 1))) >> shift
    np.testing.assert_array_equal(tosa.numpy(), numerics.rounding_right_shift(a * ma + b * mb, shift, Rounding.HALF_UP).numpy())


def test_half_up_needs_a_shift_of_two():
    """TOSA's shifts are 2..62: a factor needing shift 1 is an error naming the op and the value under half up."""
    factor = 1.5 * 2**29  # shift 1 with 31-bit multipliers
    assert numerics.quantize_multiplier(factor, what="conv 'x'").shift == 1
    with pytest.raises(QuantizationError, match=r"conv 'x'.*8\.05306e\+08 needs shift 1.*half_up.*shift 2\.\.62"):
        numerics.quantize_multiplier(factor, what="conv 'x'", rounding=Rounding.HALF_UP)
    assert numerics.quantize_multiplier(0.75 * 2**29, what="conv 'x'", rounding=Rounding.HALF_UP).shift == 2


def test_tables_and_clamp_levels_follow_the_rule():
    """Table entries and a ReLU6 ceiling are quantizations: a tie rounds by the target's rule, as the numpy
    reference computes it on exact fractions."""
    identity_ties = numerics.lookup_table(Op.LEAKYRELU, 1.0, 2.0, 1.0, rounding=Rounding.HALF_UP)  # q / 2
    assert identity_ties[128 + np.array([-5, -3, -1, 1, 3, 5])].tolist() == [-2, -1, 0, 1, 2, 3]
    for op, name in ((Op.SIGMOID, "sigmoid"), (Op.HARDSWISH, "hardswish"), (Op.GELU, "gelu")):
        np.testing.assert_array_equal(
            numerics.lookup_table(op, 0.05, 0.01, rounding=Rounding.HALF_UP), reference_lookup_table(name, 0.05, 0.01, rounding="half_up")
        )
    assert (numerics.relu6_ceiling(12.0), numerics.relu6_ceiling(12.0, Rounding.HALF_UP)) == (0, 1)  # 6 / 12 = 0.5
    assert numerics.clamp_levels((-1.0, 1.0), 2.0, Rounding.HALF_UP) == (0, 1)  # -0.5 and 0.5


def test_activation_fake_quantization_rounds_half_up_with_a_straight_through_gradient():
    quantizer = ActivationFakeQuantize(None, ScaleRule.ANY, fixed_scale=0.5, rounding=Rounding.HALF_UP)
    x = torch.tensor([-1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 63.75, -64.25, 100.0], requires_grad=True)
    y = quantizer(x)
    assert (y / 0.5).tolist() == [-2, -1, 0, 1, 2, 3, 127, -128, 127]  # 127.5 rounds up to 128 and saturates
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 1, 1, 1, 1, 0, 1, 0]  # as aten's: 0 where the rounded value leaves the range
    even = ActivationFakeQuantize(None, ScaleRule.ANY, fixed_scale=0.5)
    assert (even(x.detach()) / 0.5).tolist()[:6] == [-2, -2, 0, 0, 2, 2]


# ---- a model on a half_up target ------------------------------------------------------------------------------


class RoundingNet(nn.Module):
    """Conv (ReLU6), add, average and global pools, a squeeze-and-excitation product, a lookup table, concat, linear;
    inputs quantized at ``1/128``, where ``(k + 1/2) / 128`` is an exact tie."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 8, 1)
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 5)
        self.dequant, self.dequant_map = DeQuantStub(), DeQuantStub()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.quant(x)
        a, b = F.relu6(self.conv_a(x)), self.conv_b(x)
        s = F.avg_pool2d(a + b, 2)
        gate = torch.sigmoid(self.squeeze(F.adaptive_avg_pool2d(s, 1)))
        excited = s * gate
        both = torch.cat([excited, F.hardswish(s)], 1)
        return self.dequant(self.fc(both.mean((2, 3)))), self.dequant_map(both)


def derived_target(folder: Path, source: str, name: str, *replacements: tuple[str, str]) -> Path:
    """A target file of the user's: built-in ``source``'s, renamed ``name``, with ``replacements`` made."""
    text = (REPO / "targets" / f"{source}.toml").read_text().replace(f'name = "{source}"', f'name = "{name}"')
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


HALF_UP = ("concat_shares_input_scale = false", 'concat_shares_input_scale = false\nrounding = "half_up"')
POWER_OF_TWO = ('scale_rule = "any"', 'scale_rule = "power_of_two"')
TARGETS = {
    "npu-m half_up": lambda folder: (derived_target(folder, "npu-m", "npu-m-half-up", HALF_UP), "npu-m"),
    "npu-m half_up, power-of-two scales": lambda folder: (  # every requantization a rounding shift: ties are frequent
        derived_target(folder, "npu-m", "npu-m-half-up-pow2", HALF_UP, POWER_OF_TWO),
        derived_target(folder, "npu-m", "npu-m-pow2", POWER_OF_TWO),
    ),
    "ethos-u65-256": lambda folder: ("ethos-u65-256", derived_target(folder, "ethos-u65-256", "ethos-u65-even", ('rounding = "half_up"', ""))),
}
"""Each case's half_up target and its half_to_even twin (the same file but for the rule)."""


@pytest.fixture(scope="module", params=list(TARGETS))
def models(request, tmp_path_factory):
    """RoundingNet calibrated on the same batches for a half_up target and for its half_to_even twin: the same scales,
    two rules."""
    folder = tmp_path_factory.mktemp("rounding")
    target, twin = TARGETS[request.param](folder)
    assert (load_target(target).quantization.rounding, load_target(twin).quantization.rounding) == (Rounding.HALF_UP, Rounding.HALF_TO_EVEN)
    torch.manual_seed(0)
    net, example = RoundingNet().eval(), torch.rand(8, 3, 12, 12) * 2 - 1
    batches = [torch.rand(4, 3, 12, 12) * 2 - 1 for _ in range(3)]
    int_models = {
        rule: convert_fx(calibrate(net, example, where, iter(batches).__next__))
        for rule, where in ((Rounding.HALF_UP, target), (Rounding.HALF_TO_EVEN, twin))
    }
    return int_models, target, example, folder


def test_integer_model_records_the_rule_and_equals_the_reference(models):
    int_models, _, example, _ = models
    half_up, even = int_models[Rounding.HALF_UP], int_models[Rounding.HALF_TO_EVEN]
    assert (half_up.rounding, even.rounding) == (Rounding.HALF_UP, Rounding.HALF_TO_EVEN)
    x = _inputs()
    for int_model in (half_up, even):
        for got, want in zip(int_model.run_integer(x), run_reference(int_model.graph_module, x.numpy())):
            np.testing.assert_array_equal(got.numpy(), want)
    differs = [not torch.equal(u, e) for u, e in zip(half_up.run_integer(x), even.run_integer(x))]
    assert any(differs)  # the same scales, rounded by another rule: the test can tell the rules apart


def test_qat_quantizes_inputs_as_the_integer_model(models):
    """A QuantStub's fake quantization in QAT and the integer model's quantize round the same ties."""
    _, target, example, _ = models
    prepared = calibrate(RoundingNet().eval(), example, target, lambda: torch.randn_like(example))
    stub = next(m.output_quantizer for m in prepared.modules() if type(m) is QuantizeInput)
    assert stub.rounding is Rounding.HALF_UP
    scale = stub.scale()
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, -128.5], dtype=torch.float32) * scale  # exact: 1/128
    assert scale == 1 / 128 and (stub(x) / scale).tolist() == [-2, -1, 0, 1, 2, 3, 127, -128]
    np.testing.assert_array_equal((stub(x) / scale).numpy(), numerics.quantize(x, scale, Rounding.HALF_UP).numpy())


def test_onnx_and_torchscript_record_the_rule_and_compile_refuses_another(models, tmp_path):
    int_models, target, example, _ = models
    half_up = to_onnx(int_models[Rounding.HALF_UP], (example,), tmp_path / "up.onnx")
    metadata = {p.key: p.value for p in onnx.load(half_up).metadata_props}
    assert metadata["edgeq.rounding"] == "half_up" and load_model_file(half_up).rounding is Rounding.HALF_UP
    save_torchscript(int_models[Rounding.HALF_UP], (example,), tmp_path / "up.pt")
    assert load_model_file(tmp_path / "up.pt").rounding is Rounding.HALF_UP
    with pytest.raises(CompileError, match=r"up\.onnx: its integers round half_up .* but target npu-m rounds half_to_even; quantize"):
        compile_model(half_up, (example,), target="npu-m", out=tmp_path / "a.edgeq", simulate=True)
    even = to_onnx(int_models[Rounding.HALF_TO_EVEN], (example,), tmp_path / "even.onnx")
    name = load_target(target).name
    with pytest.raises(CompileError, match=f"but target {name} rounds half_up; quantize the model for {name} "):
        compile_model(even, (example,), target=target, out=tmp_path / "b.edgeq", simulate=True)


@pytest.fixture(scope="module")
def artifact(models) -> Path:
    """The half_up integer model compiled for its target (a simulated NPU, on this machine)."""
    int_models, target, example, folder = models
    return compile_model(int_models[Rounding.HALF_UP], (example,), target=target, out=folder / "up.edgeq", simulate=True).artifact


def _inputs() -> torch.Tensor:
    """Random inputs in [-1, 1], half of them exact ties of the input quantizer (``(k + 1/2) / 128``)."""
    torch.manual_seed(2)
    x = torch.rand(8, 3, 12, 12) * 2 - 1
    ties = (torch.randint(-128, 127, x.shape) + 0.5) / 128
    return torch.where(torch.rand(x.shape) < 0.5, ties, x)


@pytest.mark.filterwarnings("ignore::edgeq_runtime.CommandStreamWarning")  # ethos-u65-256: its command streams need the device
def test_compiled_artifact_equals_the_half_up_integer_model(models, artifact):
    """The artifact on a half_up target equals its integer model bit for bit (from float inputs, which its
    quantizer rounds half up, and from raw ones) and differs from the half_to_even model's."""
    int_models = models[0]
    half_up = int_models[Rounding.HALF_UP]
    x = _inputs()
    with Model.load(artifact) as model:
        from_float = list(model.run(x.numpy(), raw=True).values())
        from_raw = list(model.run(half_up.graph_module.quant(x).numpy(), raw=True).values())
    expected = [e.numpy() for e in half_up.run_integer(x)]
    for f, r, e in zip(from_float, from_raw, expected):
        np.testing.assert_array_equal(f, e)
        np.testing.assert_array_equal(r, e)
    assert any(not np.array_equal(f, e.numpy()) for f, e in zip(from_float, int_models[Rounding.HALF_TO_EVEN].run_integer(x)))


@pytest.mark.flow
@pytest.mark.filterwarnings("ignore::edgeq_runtime.CommandStreamWarning")  # ethos-u65-256: its command streams need the device
def test_cpp_runtime_equals_the_half_up_integer_model(models, artifact, cpp_build, tmp_path):
    """The C++ runtime (edgeq-run, x86_64) runs the same artifact to the integer model's integers, from float inputs."""
    half_up = models[0][Rounding.HALF_UP]
    x = _inputs()
    np.save(tmp_path / "x.npy", x.numpy())
    command = [str(cpp_build / "x86_64" / "edgeq-run"), str(artifact)]
    completed = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "out"), "--input", str(tmp_path / "x.npy"), "--raw"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    with Model.load(artifact) as model:
        names = list(model.run(x.numpy(), raw=True))
    for name, expected in zip(names, half_up.run_integer(x)):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{name}.npy"), expected.numpy())
