"""edgeq's int8 kernels, default schedules and the tuner's search space: every kernel class and every sampled
schedule bit-identical to the unscheduled integer program (odd shapes, channels not a multiple of the vector
width), and the dot-product instructions chosen from the target's CPU features."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from reference import requantize_channels, saturate8
from tvm import relax, s_tir
from tvm.script import relax as R

from edgeq import numerics
from edgeq.compile import schedules
from edgeq.compile.codegen import Machine, build_library
from edgeq.compile.cpu_features import dot_product, dot_product_features, host_target
from edgeq.compile.integer_relax import Conv2dSettings, integer_accumulator, requantize
from edgeq.compile.schedules import SCHEDULES, TUNABLE, classify, design_space
from edgeq.compile.select_kernels import select_kernels
from edgeq.compile.tuning_records import as_workload
from edgeq.numerics import conv_multipliers
from edgeq.targets import load_target

HERE = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
HERE_DOT = dot_product(tvm.target.Target(HERE))
"""The dot product the kernels built for ``HERE`` use (what tuned schedules of them tensorize with)."""


def kernel_module(shape, out_channels, kernel=3, stride=1, pad=1, groups=1, dense=False, seed=0, epilogue=lambda q: q, dilation=1):
    """One int8 conv2d (or dense) with bias and per-channel requantization, as edgeq's lowering writes it, then
    ``epilogue`` of its int8 result."""
    rng = np.random.default_rng(seed)
    source = relax.Var("x", relax.TensorType(list(shape), "int8"))
    in_channels = shape[-1] if dense else shape[1]
    weights_shape = (in_channels, out_channels) if dense else (out_channels, in_channels // groups, kernel, kernel)
    weights = rng.integers(-128, 128, weights_shape, dtype=np.int8)
    bias = rng.integers(-5000, 5000, out_channels, dtype=np.int32)
    conv = None if dense else Conv2dSettings((stride, stride), (pad,) * 4, (dilation, dilation), groups)
    multipliers = conv_multipliers(0.05, list(rng.uniform(0.001, 0.01, out_channels)), 0.1, what="test")
    builder = relax.BlockBuilder()
    with builder.function("main", [source]):
        with builder.dataflow():
            acc = integer_accumulator(source, weights, bias, conv)
            output = builder.emit_output(epilogue(requantize(acc, multipliers, len(shape), len(shape) - 1 if dense else 1)))
        builder.emit_func_output(output)
    return builder.get()


def run(module, opt_level, x, tmp_path, tuned=None, target=HERE):
    library = build_library(module, Machine("x86_64", target, None), opt_level, str(tmp_path / f"k{opt_level}.so"), lambda _: None, tuned)
    vm = relax.VirtualMachine(library.executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy(), library.kernels


def table_activation(q):
    """A lookup-table activation of an int8 tensor, as edgeq's lowering writes it (256 random entries)."""
    table = np.random.default_rng(7).integers(-128, 128, 256, dtype=np.int8)
    index = relax.op.add(relax.op.astype(q, "int32"), relax.const(128, "int32"))
    return relax.op.take(relax.const(table, "int8"), index, axis=0, mode="clip")


CASES = {
    "conv2d": (dict(shape=(1, 16, 12, 12), out_channels=32), "conv2d"),
    "conv2d odd channels, stride 2": (dict(shape=(2, 13, 9, 11), out_channels=21, stride=2), "conv2d"),
    "stem 7x7 3 channels": (dict(shape=(1, 3, 23, 23), out_channels=10, kernel=7, stride=2, pad=3), "conv2d"),
    "conv2d in chunks of input channels": (dict(shape=(1, 512, 3, 4), out_channels=260), "conv2d"),  # weights outweigh input
    "conv2d 1x1": (dict(shape=(1, 24, 7, 7), out_channels=20, kernel=1, pad=0), "conv2d_1x1"),
    "depthwise": (dict(shape=(1, 24, 10, 10), out_channels=24, groups=24), "depthwise_conv2d"),
    "depthwise odd, stride 2": (dict(shape=(1, 37, 9, 7), out_channels=37, stride=2, groups=37), "depthwise_conv2d"),
    "depthwise 5x5, stride 2": (dict(shape=(1, 20, 11, 9), out_channels=20, kernel=5, stride=2, pad=2, groups=20), "depthwise_conv2d"),
    "depthwise dilated": (dict(shape=(1, 16, 9, 9), out_channels=16, pad=2, groups=16, dilation=2), "depthwise_conv2d"),
    "grouped": (dict(shape=(1, 12, 6, 6), out_channels=18, groups=3), "conv2d"),
    "grouped, 3 channels a group, stride 2": (dict(shape=(1, 15, 7, 5), out_channels=10, stride=2, groups=5), "conv2d"),
    "grouped, groups of whole blocks": (dict(shape=(1, 32, 8, 8), out_channels=64, groups=2), "conv2d"),
    "grouped 1x1": (dict(shape=(1, 24, 5, 5), out_channels=24, kernel=1, pad=0, groups=4), "conv2d_1x1"),
    "conv2d, table activation": (dict(shape=(2, 13, 9, 11), out_channels=21, stride=2, epilogue=table_activation), "conv2d"),
    "conv2d 1x1, table activation": (dict(shape=(1, 24, 7, 7), out_channels=40, kernel=1, pad=0, epilogue=table_activation), "conv2d_1x1"),
    "depthwise odd, table activation": (dict(shape=(1, 37, 9, 7), out_channels=37, stride=2, groups=37, epilogue=table_activation), "depthwise_conv2d"),
    "dense": (dict(shape=(2, 37), out_channels=19, dense=True), "dense"),
    "dense 3-d": (dict(shape=(2, 3, 40), out_channels=16, dense=True), "dense"),
}


@pytest.mark.parametrize("case", CASES)
def test_every_kernel_class_is_exact_at_every_level(case, tmp_path, monkeypatch):
    """-O1 on one core; -O2 as its threshold decides, and on all cores when every kernel is worth it."""
    arguments, schedule = CASES[case]
    module = kernel_module(**arguments)
    x = np.random.default_rng(1).integers(-128, 128, arguments["shape"], dtype=np.int8)
    reference, _ = run(module, 0, x, tmp_path)  # TVM's unscheduled kernel of the same integer program
    for level, on_all_cores in ((1, False), (2, None), (2, True)):
        if on_all_cores:
            monkeypatch.setattr(schedules, "PARALLEL_ITERATIONS", {})
            monkeypatch.setattr(schedules, "PARALLEL_ITERATIONS_OTHERS", 0)
        output, kernels = run(module, level, x, tmp_path)
        np.testing.assert_array_equal(output, reference)
        assert [k.schedule for k in kernels] == [schedule]
        assert on_all_cores is None or [k.parallel for k in kernels] == [on_all_cores]


X86_CPUS = {"icelake-server": "vnni", "alderlake": "avx-vnni", "znver3": "avx2-pmaddwd", "x86-64": "plain"}
"""An x86 CPU of each dot product, by LLVM's name for it: each with no dot product beyond its own (an AVX-512 VNNI
CPU without AVX-VNNI, as AMD Zen 4 is), so that a machine with it runs that CPU's code."""


@pytest.mark.parametrize("cpu", X86_CPUS)
@pytest.mark.parametrize("case", [case for case in CASES if case.startswith(("depthwise", "grouped")) or case == "conv2d"])
def test_every_dot_product_this_cpu_runs_is_exact(cpu, case, tmp_path):
    """The kernels built for each x86 dot product (and its depthwise form) this machine can run equal the
    unscheduled program: the schedules of the CPUs it has but is not built for are run too. Built as the
    x86_64-native target builds (its ``mattr``: without AMD's SSE4a, which Intel CPUs lack)."""
    target = {**HERE, "mcpu": cpu, "mattr": list(load_target("x86_64-native").llvm.mattr)}
    if not set(dot_product_features(tvm.target.Target(target))) <= set(dot_product_features(host_target())):
        pytest.skip(f"this machine cannot run code for {cpu}")
    arguments, schedule = CASES[case]
    module = kernel_module(**arguments)
    x = np.random.default_rng(2).integers(-128, 128, arguments["shape"], dtype=np.int8)
    reference, _ = run(module, 0, x, tmp_path)
    output, kernels = run(module, 2, x, tmp_path, target=target)
    np.testing.assert_array_equal(output, reference)
    assert [k.schedule for k in kernels] == [schedule]


def test_kernels_worth_it_run_on_all_cores(tmp_path):
    """2^18 multiply-accumulates make a convolution worth waking the thread pool for; fewer run on one core."""
    for size, parallel in ((8, False), (32, True)):  # 16 channels from 16: 8 x 8 x 144 x 16 = 0.15 M; 32 x 32: 2.4 M
        x = np.zeros((1, 16, size, size), dtype=np.int8)
        _, kernels = run(kernel_module(x.shape, 16), 2, x, tmp_path)
        assert [k.parallel for k in kernels] == [parallel]


class SampledSchedules:
    """Tuning records that give every tunable kernel a random point of its search space (what ``edgeq tune``
    measures), drawn with ``seed``; remembers the decisions it drew."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.decisions: list[str] = []

    def schedule(self, function):
        sch = s_tir.Schedule(as_workload(function), seed=self.seed)
        design_space(classify(sch), HERE_DOT, parallel=True)(sch)
        self.decisions.append(str(sch.trace.decisions))
        return sch


class OtherAlternatives:
    """Tuning records whose schedules take every decision's last alternative, and single-column, single-block
    tiles: the corners the defaults never take."""

    def split(self, sch, loop, limit, default):
        return list(sch.split(loop, [None, 1]))

    def pick(self, sch, count, default):
        return count - 1

    def schedule(self, function):
        sch = s_tir.Schedule(as_workload(function))
        SCHEDULES[classify(sch)](sch, HERE_DOT, True, self)
        return sch


TUNABLE_CASES = [name for name, (_, schedule) in CASES.items() if schedule in TUNABLE]


@pytest.mark.parametrize("case", TUNABLE_CASES)
def test_every_point_of_the_tuning_space_is_exact(case, tmp_path):
    """Sampled points (four far-apart seeds: TVM's generator draws alike from near ones) and the corners the
    default schedules never take."""
    arguments, schedule = CASES[case]
    module = kernel_module(**arguments)
    x = np.random.default_rng(1).integers(-128, 128, arguments["shape"], dtype=np.int8)
    reference, _ = run(module, 0, x, tmp_path)
    samples = [SampledSchedules(seed) for seed in (1, 1000, 123457, 99991)]
    for tuned in (*samples, OtherAlternatives()):
        output, kernels = run(module, 2, x, tmp_path, tuned)
        np.testing.assert_array_equal(output, reference)
        assert [(k.schedule, k.tuned) for k in kernels] == [(schedule, True)]
    assert len({decisions for sample in samples for decisions in sample.decisions}) > 1


class TileMutations:
    """Replays sampled points of each tunable kernel's search space with each tile decision taken to its extremes
    (one column or block, or the whole loop), as MetaSchedule's mutators do; the kernels keep their defaults."""

    def __init__(self) -> None:
        self.replayed = 0

    def schedule(self, function):
        workload = as_workload(function)
        for seed in (1, 1000, 123457):
            sch = s_tir.Schedule(workload, seed=seed)
            design_space(classify(sch), HERE_DOT, parallel=True)(sch)
            for trace in (sch.trace, self._last_alternatives(sch.trace)):
                for instruction, decision in trace.decisions.items():
                    if instruction.kind.name == "SamplePerfectTile":
                        whole = int(np.prod([int(d) for d in decision]))
                        for extreme in ([whole, 1], [1, whole]):
                            mutated = trace.with_decision(instruction, extreme, remove_postproc=True)
                            mutated.apply_to_schedule(s_tir.Schedule(workload), remove_postproc=False)
                            self.replayed += 1
        return None

    @staticmethod
    def _last_alternatives(trace):
        """``trace`` with every other decision (loop orders, where the input is packed...) at its last alternative."""
        for instruction in trace.decisions:
            if instruction.kind.name == "SampleCategorical":
                trace = trace.with_decision(instruction, len(instruction.attrs[0]) - 1, remove_postproc=True)
        return trace


def depthwise_after_conv(shape=(1, 16, 10, 10), channels=64, table=False):
    """A conv2d whose int8 output only a depthwise conv2d reads (``table``: through a table activation, fused into
    the conv2d): the layout plan blocks it between them, and the depthwise kernel packs its blocked input."""
    rng = np.random.default_rng(2)

    def depthwise(q):
        weights = rng.integers(-128, 128, (channels, 1, 3, 3), dtype=np.int8)
        bias = rng.integers(-5000, 5000, channels, dtype=np.int32)
        acc = integer_accumulator(q, weights, bias, Conv2dSettings((1, 1), (1,) * 4, (1, 1), channels))
        return requantize(acc, conv_multipliers(0.1, list(rng.uniform(0.001, 0.01, channels)), 0.1, what="test"), 4, 1)

    return kernel_module(shape, channels, epilogue=(lambda q: depthwise(table_activation(q))) if table else depthwise)


@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("channels", [64, 20])
def test_sampled_points_reading_a_blocked_input_are_exact(channels, table, tmp_path):
    """The depthwise kernel packing its blocked input (a block's channels per vector), at sampled points and the
    corners (packed inside each tile), equals the unscheduled program; 20 channels fill no dot product's blocks
    (the last one padded)."""
    module = depthwise_after_conv(channels=channels, table=table)
    x = np.random.default_rng(1).integers(-128, 128, (1, 16, 10, 10), dtype=np.int8)
    reference, _ = run(module, 0, x, tmp_path)
    for tuned in (None, SampledSchedules(1), SampledSchedules(123457), OtherAlternatives()):
        output, kernels = run(module, 2, x, tmp_path, tuned)
        np.testing.assert_array_equal(output, reference)
        assert any(k.kernel.endswith(f"_nchw{HERE_DOT.lanes}c") for k in kernels)  # the layout plan's blocked copy


REPLAYED = {**{case: (lambda case=case: kernel_module(**CASES[case][0])) for case in TUNABLE_CASES}, "depthwise after conv2d": depthwise_after_conv,
    "depthwise after conv2d, padded blocks": lambda: depthwise_after_conv(channels=20),
}


@pytest.mark.parametrize("case", REPLAYED)
def test_the_tuner_can_replay_every_point_with_other_tiles(case, tmp_path):
    """A trace that no longer applies once a tile decision changes stops MetaSchedule's whole search (it stopped
    tuning resnet18 after 25 s: "old_outputs.size() == new_outputs.size()", the epilogue's loops one fewer; and
    mobilenet_v2: a depthwise kernel packing its blocked input inside each tile lost a loop of one row)."""
    module = REPLAYED[case]()
    mutations = TileMutations()
    shape = [int(d) for d in module["main"].params[0].ty.shape]
    run(module, 2, np.zeros(shape, np.int8), tmp_path, mutations)
    assert mutations.replayed > 0


def assembly(target: dict, module: tvm.IRModule | None = None) -> str:
    """The generated assembly of ``module`` (default: a conv2d) built for ``target`` (cross targets are never run
    here)."""
    module = module or kernel_module((1, 32, 8, 8), 32)
    scheduled = relax.build(module, tvm.target.Target(target), relax_pipeline=_pipeline(target))
    return scheduled.mod.imports[0].inspect_source("asm")


def _pipeline(target: dict):
    from edgeq.compile.pipeline import as_pass, split_at, stages

    t = tvm.target.Target(target)
    return as_pass(t, split_at(stages(2, t), "lower_integer")[1])


@pytest.mark.parametrize(
    "target, instruction",
    [
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}, "vpdpbusd"),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, "vpmaddwd"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, "sdot"),
    ],
)
def test_kernels_use_the_cpus_dot_product(target, instruction):
    assert instruction in assembly(target)


@pytest.mark.parametrize(
    "target, instruction",
    [
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sapphirerapids"}, "vpdpbusd\t%zmm"),
        ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}, "vpdpbusd\t%ymm"),
        ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, "sdot\tv"),
    ],
)
def test_depthwise_kernels_use_the_cpus_dot_product(target, instruction):
    depthwise = kernel_module((1, 32, 8, 8), 32, groups=32)
    assert instruction in assembly(target, depthwise)


def test_x86_kernels_have_no_legacy_sse_instructions_amid_avx():
    """On AMD CPUs LLVM widens a ReLU's int8 output (read by a global pool) with SSE4a's ``extrq``, which has no
    VEX form: amid 256-bit AVX code it took ~125 ns per instruction on a Zen 3 VM (the kernel 4x slower). The
    x86_64-native target turns SSE4a off (the x86_64 target's x86-64-v3 has none)."""
    widened_relu = kernel_module((1, 32, 8, 8), 32, epilogue=lambda q: R.astype(R.maximum(q, relax.const(0, "int8")), "int32"))
    znver3 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}
    assert "extrq" in assembly(znver3, widened_relu)  # what LLVM picks without the target's setting
    assert "extrq" not in assembly({**znver3, "mattr": list(load_target("x86_64-native").llvm.mattr)}, widened_relu)


def test_dot_product_comes_from_cpu_features():
    for cpu, name in X86_CPUS.items():
        assert dot_product(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu})).name == name
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    assert dot_product(tvm.target.Target({**arm, "mattr": ["+neon", "+dotprod"]})).name == "sdot"
    assert dot_product(tvm.target.Target({**arm, "mattr": ["+neon"]})).name == "plain"


def test_dot_product_features_of_a_cpu_and_of_this_machine():
    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    assert dot_product_features(tvm.target.Target({**x86, "mcpu": "sapphirerapids"})) == ["avx512vnni", "avx512bw", "avxvnni", "avx2"]
    assert dot_product_features(tvm.target.Target({**x86, "mcpu": "znver3"})) == ["avx2"]
    assert dot_product_features(tvm.target.Target({**x86, "mcpu": "x86-64"})) == []
    assert host_target().attrs["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()


def requantize_module(channels: int, multipliers, zero_point: int, bounds: list[int]):
    """``requantize`` of an int32 NCHW accumulator, per channel, as the lowering writes it for ``bounds`` (one per
    channel)."""
    source = relax.Var("acc", relax.TensorType([1, channels, 4, 64], "int32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [source]):
        with builder.dataflow():
            output = builder.emit_output(requantize(source, multipliers, 4, 1, zero_point, bounds))
        builder.emit_func_output(output)
    return builder.get()


NEAR_TIE = numerics.FixedPointMultiplier(1977232205, 55)
"""With ``acc = 9110917``, ``acc * M = 2**54 + 1``: just above the tie 0.5 (the result is 1), and one unit more than
float64 holds there (the rounded product is the tie, which rounds to 0)."""


@pytest.mark.parametrize("fits", [True, False], ids=["float64 form", "int64 form"])
def test_requantization_in_float64_is_exact_up_to_its_bound(fits, tmp_path):
    """Where every channel's ``bound * M < 2**53`` the epilogue rounds a float64 product (docs/numerics.md section
    6; here by adding ``1.5 * 2**52``, :func:`edgeq.compile.kernels.round_to_int32`), else it shifts an int64 one;
    both equal the int64 reference on exact ties and at each channel's largest accumulators, and the int64 form
    where float64 would be one step off. Channels are checked one by one: the largest bound times the largest
    multiplier is past 2**53 here."""
    multipliers = [
        numerics.FixedPointMultiplier(2**30, 31),  # acc / 2: a tie at every odd accumulator
        numerics.FixedPointMultiplier(2**30, 34),  # acc / 16: ties at 8 mod 16
        numerics.FixedPointMultiplier(3 * 2**28, 36),  # 3 acc / 256: ties where 3 acc = 128 mod 256
        NEAR_TIE,
    ]
    bounds = [(numerics.FLOAT64_EXACT - 1) // m.multiplier if fits else 2**31 - 1 for m in multipliers]
    assert max(bounds) * max(m.multiplier for m in multipliers) >= numerics.FLOAT64_EXACT
    rng = np.random.default_rng(0)
    acc = np.stack([rng.integers(-bound, bound + 1, (4, 64)) for bound in bounds])[None].astype(np.int32)
    acc[0, :, 0, :4] = [[bound, -bound, bound - 1, -(bound - 1)] for bound in bounds]
    acc[0, :, 1, :4] = [[1, -1, 8, -8], [8, -8, 24, -24], [128, -128, 43, -43], [0, 1, -1, 2]]  # ties and near ties
    if not fits:
        acc[0, 3, 2, :2] = [9110917, -9110917]
        assert np.round(np.float64(9110917) * NEAR_TIE.real) == 0  # where float64 would be wrong
    module = requantize_module(4, multipliers, -3, bounds)
    assert ("R.round" in module.script()) is fits
    assert ('dtype="int32") = R.clip' in module.script()) is fits  # clamped in int32: every result is below 2**31
    selected = select_kernels(HERE_DOT)(module)
    assert any(gv.name_hint.startswith("round_to_int32") for gv in selected.functions) is fits  # rounded by an add
    output, _ = run(module, 2, acc, tmp_path)
    rounded = requantize_channels(acc, [m.multiplier for m in multipliers], [m.shift for m in multipliers], axis=1)
    expected = saturate8(rounded - 3).astype(np.int8)
    np.testing.assert_array_equal(output, expected)
    assert fits or (expected[0, 3, 2, 0], expected[0, 3, 2, 1]) == (1 - 3, -1 - 3)


def test_requantization_past_int32_is_clamped_in_float64(tmp_path):
    """A real multiplier of 1024 (``M = 2**30``, ``n = 20``) takes accumulators up to ``2**22`` to ``2**32``: exact in
    float64 (``bound * M = 2**52``) but past int32, so the zero point and the clamp stay in float64; an int32
    conversion would wrap the largest outputs to -128."""
    multiplier = numerics.FixedPointMultiplier(2**30, 20)
    module = requantize_module(1, [multiplier], -3, [2**22])
    assert "R.round" in module.script() and 'dtype="float64") = R.clip' in module.script()
    acc = np.zeros((1, 1, 4, 64), np.int32)
    acc[0, 0, 0, :6] = [2**22, -(2**22), 2**21 + 5, -(2**21), 1, -1]
    output, _ = run(module, 2, acc, tmp_path)
    expected = saturate8(requantize_channels(acc, [multiplier.multiplier], [multiplier.shift], axis=1) - 3).astype(np.int8)
    np.testing.assert_array_equal(output, expected)
    assert list(output[0, 0, 0, :6]) == [127, -128, 127, -128, 127, -128]
