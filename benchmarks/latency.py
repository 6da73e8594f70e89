"""Single-image latency of edgeq's compiled artifact against ONNX Runtime and PyTorch, on the same CPU (issue 11).

Models (random init, BatchNorm statistics set on random data, calibrated on the same random batches):

- resnet18, mobilenet_v2, mobilenet_v3_small (Hardswish / Hardsigmoid as lookup tables): quantized by edgeq for
  ``--target`` and exported as QDQ ONNX;
- resnet18-ort, mobilenet_v2-ort: the same float models quantized by ONNX Runtime's ``quantize_static`` (QDQ,
  uint8 activations with zero points, int8 weights), which edgeq computes in integers (docs/numerics.md section 9);
- on request (``--models``), regnet_y_400mf (grouped 3x3 convolutions, 8 channels a group; squeeze-and-excitation),
  quantized by edgeq.

For each model the QDQ file is compiled by edgeq at -O2 for this CPU (``simulate=True``), and these engines run
in one process, interleaved (every run calls each engine once, in turn, after a pause in which the threads of
the engine before go idle: see ``SETTLE_S``), on 2 threads each, after warm-up runs:

- edgeq default: the compiled artifact with the default schedules (edgeq_runtime, float input and output, as
  ONNX Runtime's);
- edgeq tuned (with ``--tune MINUTES``): the artifact compiled with the records of ``edgeq tune`` run on this
  machine for that long per model first (fresh records each run: the figure is what that budget buys);
- ONNX Runtime int8: the same QDQ file, configured for this CPU by edgeq.export.peer (or as ``--peer`` names);
- PyTorch int8: the float model quantized by PyTorch's FX flow for its x86 backend;
- ONNX Runtime fp32 and PyTorch fp32: the float model.

Prints this CPU (LLVM's name and int8 dot-product features), the ONNX Runtime configuration, per model the
compile time, a numerics check (edgeq's own models: the artifact equals the integer model bit for bit; the
ONNX Runtime file: the largest difference from ONNX Runtime in output steps) and the median latency of each engine
with its ratio to ONNX Runtime int8; then one markdown table of all models. Progress goes to stderr.

With ``--alone`` the int8 engines are then measured each by itself, blocks of runs back to back (as an application
that runs only it), the engines taking turns over several rounds: edgeq's artifacts, ONNX Runtime int8 as above,
and ONNX Runtime int8 with its idle threads spinning (its own default, which the interleaved measurement cannot
allow: spinning threads take the cores of the next engine).

    .venv/bin/python benchmarks/latency.py [--models resnet18,mobilenet_v2] [--size 224] [--runs 30] [--warmup 3]
        [--tune MINUTES] [--alone]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from edgeq_runtime.vm import bound_pool_spinning  # noqa: E402

bound_pool_spinning()  # before TVM's first thread pool (compiling starts one)

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import tvm
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import float_onnx, ort_quantize_static, random_batches, torchvision_model  # noqa: E402

from edgeq.compile import CompileResult, compile_model  # noqa: E402
from edgeq.compile.cpu_features import dot_product, dot_product_features, host_target  # noqa: E402
from edgeq.export import to_onnx  # noqa: E402
from edgeq.export.peer import PEER_PATHS, PeerPath, peer_path, session  # noqa: E402
from edgeq.quantization import calibrate, convert_fx  # noqa: E402
from edgeq.quantization.integer_model import IntegerModel  # noqa: E402
from edgeq.tune import tune_model  # noqa: E402
from edgeq_runtime import Model  # noqa: E402

THREADS = 2
EDGEQ_MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")
ORT_SUFFIX = "-ort"
ORT_QUANTIZED = ("resnet18-ort", "mobilenet_v2-ort")
"""Models quantized by ONNX Runtime's quantize_static (the name less ``-ort``)."""
MODELS = (*EDGEQ_MODELS, *ORT_QUANTIZED)
"""The models measured by default."""
ON_REQUEST = ("regnet_y_400mf",)
"""More models edgeq quantizes, measured when ``--models`` names them."""
ENGINES = ("edgeq default", "edgeq tuned", "ORT int8", "PyTorch int8", "ORT fp32", "PyTorch fp32")
BASELINE = "ORT int8"
ALONE_ENGINES = ("edgeq default", "edgeq tuned", "ORT int8", "ORT int8 spinning")
ALONE_BASELINE = "ORT int8 spinning"
"""With ``--alone``: the int8 engines measured each by itself, in blocks of runs back to back, against ONNX Runtime
in its own default configuration (idle threads spin, which the interleaved measurement cannot allow)."""
CALIBRATION_BATCHES = 4
STARTED = time.perf_counter()

Engine = Callable[[], object]
"""One inference on the benchmark's input."""


@dataclass
class Subject:
    """One model of the benchmark: its int8 QDQ file and the float model it came from.

    Attributes:
        name: the model's name in the tables.
        qdq_path: the QDQ ONNX file edgeq compiles and ONNX Runtime int8 runs.
        float_model: the float torchvision model (without edgeq's stubs).
        float_path: ``float_model`` exported to ONNX.
        int_model: edgeq's integer model the file was exported from (None for ONNX Runtime's file).
    """

    name: str
    qdq_path: Path
    float_model: nn.Module
    float_path: Path
    int_model: IntegerModel | None


def progress(line: str) -> None:
    """A progress line on stderr, after the seconds since the start."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {line}", file=sys.stderr, flush=True)


def cpu_line() -> str:
    """This CPU as LLVM names it, its int8 dot-product features and the kernels edgeq picks for it."""
    target = host_target()
    features = ", ".join(dot_product_features(target)) or "none of them"
    return f"CPU: {target.attrs['mcpu']} (int8 dot-product features: {features}; edgeq kernels: {dot_product(target).name})"


def make_subject(name: str, batches: Sequence[torch.Tensor], target: str, folder: Path) -> Subject:
    """``name``'s float model, quantized by edgeq for ``target`` or, for the ``-ort`` models, by ONNX Runtime."""
    wrapped = torchvision_model(name.removesuffix(ORT_SUFFIX))
    example = batches[0]
    float_path = float_onnx(wrapped.model, example, folder / f"{name}-float.onnx")
    if name in ORT_QUANTIZED:
        qdq_path = ort_quantize_static(float_path, folder / f"{name}.onnx", [b.numpy() for b in batches])
        return Subject(name, qdq_path, wrapped.model, float_path, None)
    prepared = calibrate(copy.deepcopy(wrapped), batches, example_inputs=(example,), target=target)
    int_model = convert_fx(prepared)
    return Subject(name, to_onnx(int_model, (example,), folder / f"{name}.onnx"), wrapped.model, float_path, int_model)


def pytorch_int8(float_model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """``float_model`` quantized by PyTorch's FX flow for its x86 backend, calibrated on ``batches``
    (deprecated in PyTorch: its deprecation warnings are silenced here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecat", category=UserWarning)
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx as torch_convert_fx
        from torch.ao.quantization.quantize_fx import prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(float_model), get_default_qconfig_mapping("x86"), (batches[0],))
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        return torch_convert_fx(prepared)


def check_numerics(subject: Subject, artifact: Model, peer: ort.InferenceSession, x: np.ndarray) -> str:
    """edgeq's own models: the artifact's raw output equals the integer model's (raises otherwise). ONNX
    Runtime's file: the largest difference of the artifact's output from ONNX Runtime's, in output steps."""
    output = artifact.outputs[0]
    ours = artifact.run(x, raw=True)[output.name]
    if subject.int_model is not None:
        expected = subject.int_model.run_integer(torch.from_numpy(x)).numpy()
        if not np.array_equal(ours, expected):
            differing = int((ours != expected).sum())
            raise AssertionError(f"{subject.name}: the artifact differs from the integer model on {differing} of {ours.size} outputs")
        return "bit-exact: True"
    (theirs,) = peer.run(None, {peer.get_inputs()[0].name: x})
    steps = np.abs(ours.astype(np.int64) - output.quantize(theirs).astype(np.int64))
    return f"max difference from ONNX Runtime: {int(steps.max())} output step(s)"


def try_pytorch_int8(subject: Subject, batches: Sequence[torch.Tensor]) -> nn.Module | None:
    """:func:`pytorch_int8` of the subject's float model, or None after printing why PyTorch could not quantize it."""
    try:
        return pytorch_int8(subject.float_model, batches)
    except Exception as error:  # noqa: BLE001 - a third-party quantizer's failure is reported, not fatal
        print(f"  PyTorch int8 skipped for {subject.name}: {type(error).__name__}: {error}")
        return None


def engines(
    subject: Subject, artifacts: dict[str, Model], peer: ort.InferenceSession, quantized: nn.Module | None, x: torch.Tensor
) -> dict[str, Engine]:
    """The engines of :data:`ENGINES`, in that order, as calls on the input ``x`` (edgeq's by ``artifacts``' names,
    PyTorch int8 only if ``quantized`` exists)."""
    x_np = x.numpy()
    input_name = peer.get_inputs()[0].name
    float_session = session(onnx.load(str(subject.float_path)), PEER_PATHS["fused"], THREADS)  # ORT's defaults
    calls: dict[str, Engine] = {name: (lambda model=model: model.run(x_np)) for name, model in artifacts.items()}
    calls["ORT int8"] = lambda: peer.run(None, {input_name: x_np})
    if quantized is not None:
        calls["PyTorch int8"] = lambda: quantized(x)
    calls["ORT fp32"] = lambda: float_session.run(None, {"x": x_np})
    calls["PyTorch fp32"] = lambda: subject.float_model(x)
    return calls


SETTLE_S = 0.02
"""Pause before each timed run, so that the idle threads of the engine before have gone to sleep: edgeq's pool
workers spin about 5 ms after a run (edgeq_runtime.vm.POOL_SPIN_COUNT; TVM's default kept a core busy for 70 ms,
which slowed the next engine: ONNX Runtime's mobilenet_v2 file ran 3.7 ms alone and 4.6-6.0 ms in this benchmark);
ONNX Runtime's (allow_spinning=0) and PyTorch's (OMP_WAIT_POLICY=PASSIVE) do not spin."""


def measure(calls: dict[str, Engine], warmup: int, runs: int) -> dict[str, float]:
    """Median milliseconds of each engine over ``runs`` interleaved runs, after ``warmup`` runs of each; each
    timed run starts after :data:`SETTLE_S` of quiet."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(warmup):
            for call in calls.values():
                call()
        for _ in range(runs):
            for name, call in calls.items():
                time.sleep(SETTLE_S)
                started = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


ALONE_ROUNDS = 6
ALONE_SETTLE_S = 0.2
"""With ``--alone``: the engines take turns in this many rounds, each block of runs after this much quiet (a
spinning ONNX Runtime pool has gone to sleep by then). Run one engine after another instead, the machine's drift
between them moved the ratios by up to 20 % from run to run (resnet18-ort 0.90x to 1.16x of ONNX Runtime)."""


def measure_alone(calls: dict[str, Engine], warmup: int, runs: int) -> dict[str, float]:
    """Median milliseconds of each engine run by itself: in each of :data:`ALONE_ROUNDS` rounds, after
    :data:`ALONE_SETTLE_S` of quiet, a block of ``warmup`` then ``runs / ALONE_ROUNDS`` runs back to back (as an
    application that runs only it), the engines in turn (the order rotating), so that a drifting machine's slow and
    fast spells fall on all of them."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    with torch.inference_mode():
        for turn in range(ALONE_ROUNDS):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                time.sleep(ALONE_SETTLE_S)
                for _ in range(warmup):
                    calls[name]()
                for _ in range(max(runs // ALONE_ROUNDS, 1)):
                    started = time.perf_counter()
                    calls[name]()
                    times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def cell(medians: dict[str, float], engine: str, baseline: str = BASELINE) -> str:
    """``X ms (Yx)``: the engine's median and its ratio to ``baseline`` (``n/a`` if it did not run)."""
    if engine not in medians:
        return "n/a"
    return f"{medians[engine]:.2f} ms ({medians[engine] / medians[baseline]:.2f}x)"


def print_model_table(medians: dict[str, float], engines: Sequence[str] = ENGINES, baseline: str = BASELINE) -> None:
    """One model's engines, one a line: median latency and ratio to ``baseline``."""
    for engine in engines:
        print(f"  {engine:<18}{cell(medians, engine, baseline)}")


def print_markdown(results: dict[str, dict[str, float]], engines: Sequence[str] = ENGINES, baseline: str = BASELINE) -> None:
    """All models as one markdown table of ``X ms (Yx)`` cells."""
    print("| model | " + " | ".join(engines) + " |")
    print("|---|" + "---|" * len(engines))
    for name, medians in results.items():
        print(f"| {name} | " + " | ".join(cell(medians, engine, baseline) for engine in engines) + " |")


def benchmark_model(name: str, args: argparse.Namespace, path: PeerPath, folder: Path) -> tuple[dict[str, float], dict[str, float], float]:
    """Quantize, export, compile and measure one model; print its table. Returns the medians (interleaved, and
    alone with ``--alone``, else empty) and the compile seconds."""
    torch.manual_seed(0)
    shape = (1, 3, args.size, args.size)
    batches = [torch.from_numpy(b) for b in random_batches(shape, CALIBRATION_BATCHES)]
    x = torch.randn(shape)
    progress(f"{name}: quantizing and exporting")
    subject = make_subject(name, batches, args.target, folder)
    progress(f"{name}: compiling (-O2, {args.target} simulated on this CPU)")
    result = compile_edgeq(subject, args.target, folder / f"{name}.edgeq", None)
    compile_seconds = sum(result.seconds.values())
    built = {"edgeq default": result}
    if args.tune:
        records = folder / f"{name}-records"
        progress(f"{name}: tuning for {args.tune} min")
        tuned = tune_model(subject.qdq_path, target=args.target, simulate=True, budget_minutes=args.tune, records=records,
                           progress=lambda line: progress(f"{name}: {line}"))
        print("\n".join(f"  {line}" for line in tuned.summary_lines()))
        built["edgeq tuned"] = compile_edgeq(subject, args.target, folder / f"{name}-tuned.edgeq", records)
    peer = session(onnx.load(str(subject.qdq_path)), path, THREADS)
    print(f"\n{name} 1x3x{args.size}x{args.size}: compiled in {compile_seconds:.1f} s")
    with contextlib.ExitStack() as stack:
        artifacts = {engine: stack.enter_context(Model.load(r.artifact, num_threads=THREADS)) for engine, r in built.items()}
        for engine, artifact in artifacts.items():
            print(f"  {engine}: {check_numerics(subject, artifact, peer, x.numpy())}")
        calls = engines(subject, artifacts, peer, try_pytorch_int8(subject, batches), x)
        progress(f"{name}: measuring {', '.join(calls)} ({args.warmup} warm-up + {args.runs} runs)")
        medians = measure(calls, args.warmup, args.runs)
        print_model_table(medians)
        alone = {}
        if args.alone:
            alone_calls = {engine: calls[engine] for engine in artifacts} | {"ORT int8": calls["ORT int8"]}
            spinning = session(onnx.load(str(subject.qdq_path)), path, THREADS, spinning=True)
            feed = {spinning.get_inputs()[0].name: x.numpy()}  # built once, as engines() does: not timed
            alone_calls[ALONE_BASELINE] = lambda: spinning.run(None, feed)
            progress(f"{name}: measuring {', '.join(alone_calls)}, each alone")
            alone = measure_alone(alone_calls, args.warmup, args.runs)
            print("  alone, in turns of back-to-back runs:")
            print_model_table(alone, ALONE_ENGINES, ALONE_BASELINE)
    return medians, alone, compile_seconds


def compile_edgeq(subject: Subject, target: str, out: Path, records: Path | None) -> CompileResult:
    """The subject's QDQ file compiled at -O2 for this CPU: with ``records``' tuned schedules, else the default
    schedules only (whatever records edgeq's cache holds)."""
    return compile_model(
        subject.qdq_path, target=target, out=out, opt_level=2, simulate=True, tuning_records=records, tuned=records is not None,
        progress=lambda line: progress(f"{subject.name}: {line}"),
    )


def model_names(value: str) -> list[str]:
    """``--models``: comma-separated names from :data:`MODELS`."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in (*MODELS, *ON_REQUEST)] if names else [value]
    if unknown:
        choices = ", ".join((*MODELS, *ON_REQUEST))
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(map(repr, unknown))}; choose from {choices}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=model_names, default=list(MODELS),
                        help=f"comma-separated, from {', '.join((*MODELS, *ON_REQUEST))} (default: {', '.join(MODELS)})")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per engine (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per engine first (default 3)")
    parser.add_argument("--target", default="npu-m", help="edgeq's quantization target, simulated on this CPU (default npu-m)")
    parser.add_argument("--peer", choices=sorted(PEER_PATHS), help="ONNX Runtime int8 configuration (default: chosen for this CPU)")
    parser.add_argument("--tune", type=float, metavar="MINUTES", help="tune each model this long first and measure 'edgeq tuned' too")
    parser.add_argument("--alone", action="store_true", help="also measure the int8 engines each by itself, ONNX Runtime with spinning too")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    path = PEER_PATHS[args.peer] if args.peer else peer_path()
    print(cpu_line())
    print(f"ONNX Runtime {ort.__version__}, int8 path: {path.name} ({'named by --peer' if args.peer else path.reason})")
    print(f"PyTorch {torch.__version__}, TVM {tvm.__version__}; {THREADS} threads each, batch 1, median of {args.runs} runs after {args.warmup} warm-up runs")
    print(f"edgeq tuned: tuned on this machine for {args.tune} min per model" if args.tune else "edgeq tuned: not measured (--tune MINUTES)")
    results, alone, compile_seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            results[name], alone[name], compile_seconds[name] = benchmark_model(name, args, path, Path(folder))
    print(f"\nMedian latency, 1x3x{args.size}x{args.size}, {THREADS} threads (ratio to {BASELINE}):\n")
    print_markdown(results)
    if args.alone:
        print(f"\nEach engine alone, in turns of back-to-back runs (ratio to {ALONE_BASELINE}, ONNX Runtime's default):\n")
        print_markdown(alone, ALONE_ENGINES, ALONE_BASELINE)
    print("\nedgeq compile time (-O2): " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in compile_seconds.items()))


if __name__ == "__main__":
    main()
