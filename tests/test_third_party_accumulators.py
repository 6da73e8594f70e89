"""Third-party files whose int32 accumulator could overflow (ONNX Runtime's quantize_static of googlenet: a bias
quantized at a tiny ``s_in * s_w[c]``) compile with an int64 accumulator for that layer, exactly
(docs/numerics.md section 5), and check says so; a layer edgeq cannot lower is one line naming its node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tvm
from models import float_onnx, ort_quantize_static, random_batches, without_identities
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType
from qdq_reference import run_qdq_reference
from reference import requantize_channels, saturate8
from tvm import relax

from edgeq.check import check_model
from edgeq.compile import CompileError, compile_model
from edgeq.compile.codegen import Machine, build_library
from edgeq.compile.integer_relax import requantize, rounding_rule
from edgeq.errors import QuantizationError
from edgeq.export.peer import session
from edgeq.numerics import FixedPointMultiplier
from edgeq.targets import Rounding
from edgeq_runtime import Model

HERE = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
ACCUMULATOR_NOTE = "computed with an int64 accumulator on the CPU"


def _linear_file(path: Path, bias: list[int], weights: np.ndarray, output_scale: float = 0.5) -> Path:
    """A QDQ Gemm on uint8 activations (zero point 128): x -> Q -> DQ -> Gemm(DQ(w) per channel, DQ(b)) -> Q -> DQ,
    the bias int32 at ``s_in * s_w[c]`` as ONNX Runtime writes it."""
    features = weights.shape[0]
    input_scale, weight_scales = np.float32(0.05), np.full(features, 2.0**-12, np.float32)
    constants = [
        numpy_helper.from_array(np.array(input_scale), "s_x"),
        numpy_helper.from_array(np.array(128, np.uint8), "z_x"),
        numpy_helper.from_array(weights.astype(np.int8), "w_q"),
        numpy_helper.from_array(weight_scales, "s_w"),
        numpy_helper.from_array(np.zeros(features, np.int8), "z_w"),
        numpy_helper.from_array(np.array(bias, np.int32), "b_q"),
        numpy_helper.from_array((input_scale * weight_scales).astype(np.float32), "s_b"),
        numpy_helper.from_array(np.zeros(features, np.int32), "z_b"),
        numpy_helper.from_array(np.array(output_scale, np.float32), "s_y"),
        numpy_helper.from_array(np.array(128, np.uint8), "z_y"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["x_q"], "x_quantize"),
        helper.make_node("DequantizeLinear", ["x_q", "s_x", "z_x"], ["x_dq"], "x_dequantize"),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w"], "w_dequantize", axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "s_b", "z_b"], ["b"], "b_dequantize", axis=0),
        helper.make_node("Gemm", ["x_dq", "w", "b"], ["y_float"], "fc", transB=1),
        helper.make_node("QuantizeLinear", ["y_float", "s_y", "z_y"], ["y_q"], "y_quantize"),
        helper.make_node("DequantizeLinear", ["y_q", "s_y", "z_y"], ["y"], "y_dequantize"),
    ]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, weights.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, features])], constants,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _wide_linear(path: Path) -> Path:
    """Channel 0's bias is 2**31 - 2**19 with 64 weights of +-127: bound ``2**31 - 2**19 + 128 * 64 * 127``, past
    int32; channels 1 and 2 stay within it (channel 2's bias alone passes 2**30)."""
    generator = np.random.default_rng(3)
    weights = generator.choice([-127, 127], size=(3, 64))
    weights[1] //= 4
    return _linear_file(path, [2**31 - 2**19, -5000, -(2**30) - 7], weights)


def _inputs(count: int = 4) -> list[np.ndarray]:
    generator = np.random.default_rng(11)
    return [generator.uniform(-6.4, 6.35, size=(4, 64)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("opt_level", [0, 2])
def test_an_accumulator_beyond_int32_is_computed_in_int64_exactly(opt_level, tmp_path):
    path = _wide_linear(tmp_path / "wide.onnx")
    result = compile_model(path, target="x86_64", out=tmp_path / "wide.edgeq", opt_level=opt_level, progress=lambda _: None)
    assert 'out_dtype="int64"' in result.module.script()
    model_file = onnx.load(str(path))
    extremes = [np.full((4, 64), value, np.float32) for value in (-6.4, 6.35)]
    with Model.load(result.artifact) as artifact:
        name = artifact.outputs[0].name
        for x in [*extremes, *_inputs()]:
            ours = artifact.run({"x": x}, raw=True)[name].astype(np.int64)
            np.testing.assert_array_equal(ours, run_qdq_reference(model_file, {"x": x})[name])


SPLIT = [
    FixedPointMultiplier(2**30, 55),  # acc / 2**25: ties at odd multiples of 2**24
    FixedPointMultiplier(2**31 - 1, 62),
    FixedPointMultiplier(2147483629, 40),
    FixedPointMultiplier(2**30, 20),  # saturates past |acc| = 2**8
]
"""Multipliers whose products with accumulators up to 2**40 pass int64's exact range for the one-shift form."""


@pytest.mark.parametrize("rounding", [Rounding.HALF_TO_EVEN, Rounding.HALF_UP])
@pytest.mark.parametrize("opt_level", [0, 2])
def test_the_requantization_of_an_int64_accumulator_is_exact(rounding, opt_level, tmp_path):
    """``round(acc * M / 2**n)`` by halves of the accumulator (``acc = h * 2**k + l``) equals Python's integers at
    the bounds, on ties and at random."""
    bound = 2**40
    source = relax.Var("acc", relax.TensorType([1, len(SPLIT), 2, 64], "int64"))
    builder = relax.BlockBuilder()
    with rounding_rule(rounding), builder.function("main", [source]):
        with builder.dataflow():
            output = builder.emit_output(requantize(source, SPLIT, 4, 1, -3, [bound] * len(SPLIT)))
        builder.emit_func_output(output)
    rng = np.random.default_rng(5)
    acc = rng.integers(-bound, bound + 1, (1, len(SPLIT), 2, 64), dtype=np.int64)
    acc[0, :, 0, :4] = [bound, -bound, bound - 1, -(bound - 1)]
    acc[0, :, 1, :8] = [2**24, -(2**24), 3 * 2**24, -3 * 2**24, 5 * 2**24 + 1, 1, -1, 0]
    acc[0, 1, 1, 8:12] = [2**31 - 1, -(2**31 - 1), 3 * 2**30, -3 * 2**30]
    library = build_library(builder.get(), Machine("x86_64", HERE, None), opt_level, str(tmp_path / "r.so"), lambda _: None)
    vm = relax.VirtualMachine(library.executable, tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(acc)).numpy()
    rounded = requantize_channels(acc, [m.multiplier for m in SPLIT], [m.shift for m in SPLIT], 1, rounding.value)
    np.testing.assert_array_equal(ours, saturate8(rounded - 3).astype(np.int8))


def test_check_notes_the_int64_accumulator(tmp_path):
    report = check_model(_wide_linear(tmp_path / "wide.onnx"), target="x86_64")
    (reason,) = report.node("fc").reasons
    assert reason.rule == "int64_accumulator" and ACCUMULATOR_NOTE in reason.message
    npu = check_model(tmp_path / "wide.onnx", target="npu-m").node("fc")
    assert npu.placement.value == "CPU" and npu.reasons[0].rule == "int64_accumulator"


def test_inconsistent_scales_are_one_line_naming_the_node(tmp_path):
    """An output scale 2**-31 times the accumulator's needs a multiplier of 2**31 (shift -1): check refuses it."""
    path = _linear_file(tmp_path / "bad.onnx", [0, 0, 0], np.full((3, 64), 127), output_scale=0.05 * 2.0**-43)
    with pytest.raises(CompileError, match=r"^Gemm 'fc' cannot run on x86_64: 'fc' channel 0: .* needs shift -1;[^\n]*$"):
        compile_model(path, target="x86_64", out=tmp_path / "bad.edgeq", progress=lambda _: None)
    assert not (tmp_path / "bad.edgeq").exists()


def test_a_unit_the_lowering_refuses_is_one_line_naming_its_node(tmp_path, monkeypatch):
    """An error inside TVM's rewriter reaches Python as a RuntimeError with TVM's traceback; compile names the ONNX
    node from the provenance instead (here the rule's multipliers fail as if check had let them through)."""
    from edgeq.compile.lowering import weighted

    def refused(*_args, **_kwargs):
        raise QuantizationError("requantization refused")

    monkeypatch.setattr(weighted, "conv_multipliers", refused)
    path = _wide_linear(tmp_path / "wide.onnx")
    with pytest.raises(CompileError, match=r"^linear 'fc': requantization refused$"):
        compile_model(path, target="x86_64", out=tmp_path / "wide.edgeq", progress=lambda _: None)


# ---- googlenet from ONNX Runtime ----------------------------------------------------------------------------------

GOOGLENET_SHAPE = (1, 3, 64, 64)


_GOOGLENET_VARIANTS = {  # quantize_static's settings, and the layers needing an int64 accumulator
    "uint8": ({}, 0),
    "int8-per-channel": (dict(activation=QuantType.QInt8, per_channel=True), 1),
}


@pytest.fixture(scope="module", params=sorted(_GOOGLENET_VARIANTS))
def googlenet_file(request, tmp_path_factory) -> tuple[Path, int]:
    """ONNX Runtime's quantize_static of googlenet: uint8 per tensor (its accumulators fit int32, which the old
    worst-case bound ``K * 128 * 127 + max|b|`` refused), int8 per channel (the classifier's do not)."""
    import torchvision

    folder = tmp_path_factory.mktemp("googlenet")
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    float_path = without_identities(float_onnx(model, torch.randn(GOOGLENET_SHAPE), folder / "f.onnx"))
    settings, wide = _GOOGLENET_VARIANTS[request.param]
    return ort_quantize_static(float_path, folder / "q.onnx", random_batches(GOOGLENET_SHAPE, count=2), **settings), wide


@pytest.mark.flow
def test_googlenet_from_onnx_runtime_is_exact_and_within_one_step(googlenet_file, tmp_path):
    """Slow (googlenet's 57 convolutions built at -O2): the artifact equals the int64 reference and ONNX Runtime
    within one output step."""
    path, wide = googlenet_file
    result = compile_model(path, target="x86_64", out=tmp_path / "q.edgeq", progress=lambda _: None)
    assert sum(any(r.rule == "int64_accumulator" for r in n.reasons) for n in result.report.nodes) == wide
    model_file = onnx.load(str(path))
    peer = session(model_file)
    quant = result.manifest["outputs"][0]["quant"]
    with Model.load(result.artifact) as artifact:
        name = artifact.outputs[0].name
        for x in random_batches(GOOGLENET_SHAPE, count=2, seed=1):
            ours = artifact.run({"x": x}, raw=True)[name].astype(np.int64)
            np.testing.assert_array_equal(ours, run_qdq_reference(model_file, {"x": x})[name])
            (theirs,) = peer.run(None, {"x": x})
            steps = np.rint(theirs / np.float32(quant["scale"][0])) + quant["zero_point"][0]
            assert np.abs(ours - steps).max() <= 1
