"""The ``edgeq`` command line: ``targets``, ``check``, ``compile``, ``tune``, ``run``, ``perf``, ``visualize``.

Exit status: 0 success; 1 an error, printed as one line naming the file, node or key (a missing or unreadable
model, an output path that is a folder, a device or the input, a failed write); 2 a usage error; 4 ``check``
found an op that cannot run anywhere on the target (no CPU fallback).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from edgeq import __version__
from edgeq.errors import EdgeqError
from edgeq.fileio import atomic_write, readable_file, refuse_input_as_output, refuse_non_file

EXIT_ERROR = 1
EXIT_NOT_DEPLOYABLE = 4
STANDARD_OUTPUT = Path("-")
"""``--json -``: the report goes to standard output."""


def _say(console: Console, line: str) -> None:
    """Print one line as it is: no markup (a path may hold brackets), no highlighting, never wrapped (a path stays
    whole for the user to copy, however narrow the terminal)."""
    console.print(line, highlight=False, markup=False, soft_wrap=True)


def _targets(args: argparse.Namespace, console: Console) -> int:
    from edgeq.targets import list_targets

    if args.markdown:
        from edgeq.check.supported_ops import supported_ops_markdown

        sys.stdout.write(supported_ops_markdown() + "\n")
        return 0
    for target in list_targets():
        _say(console, target.summary())
    return 0


def _check(args: argparse.Namespace, console: Console) -> int:
    from edgeq.check import check_model

    if args.json and args.json != STANDARD_OUTPUT:
        _check_output(args.json, args.model, "--json")
    report = check_model(args.model, target=args.target, advice=not args.no_advice)
    report.render(console)
    if args.json == STANDARD_OUTPUT:
        sys.stdout.write(report.to_json() + "\n")
    elif args.json:
        with atomic_write(args.json) as temporary:
            temporary.write_text(report.to_json() + "\n", encoding="utf-8")
        _say(console, f"wrote {args.json}")
    return 0 if report.deployable else EXIT_NOT_DEPLOYABLE


def _check_output(path: Path, model: Path, option: str) -> None:
    """Refuse, before any work, an output file path that names the model or something not a file (a folder, a
    device); :func:`~edgeq.fileio.atomic_write` refuses the latter again when it writes."""
    refuse_input_as_output(path, model, option)
    refuse_non_file(path)


def _path(text: str) -> Path:
    """A path, not empty (an empty one would silently mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path; got ''")
    return Path(text)


def _shape(text: str) -> tuple[str, list[int]]:
    """``NAME=1x3x224x224``: an input's name and its dimensions, each >= 1."""
    name, _, dims = text.partition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=1x3x224x224 (each dimension >= 1); got {text!r}")
    return name, shape


class _InputShapes(argparse.Action):
    """Collects repeated ``--input-shape NAME=...`` into a dict; a name given twice is a usage error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: tuple[str, list[int]],
                 option_string: str | None = None) -> None:
        name, shape = value
        shapes = dict(getattr(namespace, self.dest) or {})
        if name in shapes:
            parser.error(f"argument {option_string}: input {name!r} given twice")
        setattr(namespace, self.dest, {**shapes, name: shape})


def _numbered(console: Console):
    """A progress callback printing numbered lines."""
    count = [0]

    def progress(line: str) -> None:
        count[0] += 1
        _say(console, f"[{count[0]}] {line}")

    return progress


def _compile(args: argparse.Namespace, console: Console) -> int:
    from edgeq.compile import compile_model

    if args.output:
        _check_output(args.output, args.model, "-o")
    result = compile_model(
        args.model,
        target=args.target,
        out=args.output,
        opt_level=args.opt_level,
        simulate=args.simulate,
        input_shapes=args.input_shape or {},
        progress=_numbered(console),
        tuning_records=args.tuning_records,
        tuned=not args.untuned,
    )
    for line in result.summary_lines():
        _say(console, line)
    return 0


def _export(args: argparse.Namespace, console: Console) -> int:
    from edgeq.export.tosa import to_tosa

    _check_output(args.output, args.model, "-o")
    graph = to_tosa(args.model, None, args.output)
    inputs = ", ".join(f"{t.source} {'x'.join(map(str, t.shape))}" for t in graph.inputs)
    outputs = ", ".join(f"{t.source} {'x'.join(map(str, t.shape))} {t.dtype}" for t in graph.outputs)
    _say(console, f"wrote {args.output} (TOSA 1.0; inputs {inputs}; outputs {outputs}; 4-D tensors NHWC)")
    return 0


def _minutes(text: str) -> float:
    """A positive, finite number of minutes (``--budget``)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes; got {text!r}")
    return value


def _tune(args: argparse.Namespace, console: Console) -> int:
    from edgeq.tune import Tracker, tune_model

    if (args.rpc is None) != (args.key is None):
        raise EdgeqError("--rpc HOST:PORT and --key KEY go together (the tracker, and the key of the boards to use)")
    result = tune_model(
        args.model,
        target=args.target,
        budget_minutes=args.budget,
        records=args.output,
        tracker=Tracker.parse(args.rpc, args.key) if args.rpc else None,
        simulate=args.simulate,
        input_shapes=args.input_shape or {},
        progress=_numbered(console),
    )
    for line in result.summary_lines():
        _say(console, line)
    return 0


def _count(text: str) -> int:
    """A whole number >= 1 (``--bench``, ``--threads``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}")
    return value


def _run(args: argparse.Namespace, console: Console) -> int:
    from edgeq.run import run_artifact

    def say(line: str) -> None:
        _say(console, line)

    result = run_artifact(args.model, args.input or [], args.output_dir, args.runtime, args.bench, args.raw, say, args.threads)
    for path in result.outputs.values():
        say(f"wrote {path}")
    if result.timing:
        say(result.timing + (" (emulated)" if result.emulated else ""))
    return 0


def _perf(args: argparse.Namespace, console: Console) -> int:
    from edgeq.perf import perf_model
    from edgeq.perf.text import perf_region_lines

    result = perf_model(args.model, out_dir=args.output, target=args.target, recalibrate=args.recalibrate)
    summary = result.summary
    _say(
        console,
        f"estimated latency {summary.latency_ms:.3f} ms ({summary.fps:.1f} fps) on {result.target}: NPU {summary.npu_ms:.3f} ms, "
        f"CPU {summary.cpu_ms:.3f} ms, transitions {summary.transition_ms:.3f} ms, invocation {summary.invocation_ms:.3f} ms; "
        f"CPU figures {result.figures['cpu_source']}",
    )
    for line in perf_region_lines(result):
        _say(console, line)
    _say(console, f"wrote {result.report_json} and {result.report_html}")
    return 0


def _visualize(args: argparse.Namespace, console: Console) -> int:
    from edgeq.visualize import visualize_model

    output = args.output or args.model.with_suffix(".svg")
    _check_output(output, args.model, "-o")
    path = visualize_model(args.model, save_path=output, target=args.target)
    _say(console, f"wrote {path}")
    return 0


def _model_arguments(model_help: str, target_help: str) -> argparse.ArgumentParser:
    """A parent parser for the commands that read a model: the model's path and ``--target``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("model", type=_path, help=model_help)
    parent.add_argument("--target", help=target_help)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands: targets, check, compile, export, tune, run, perf, visualize)."""
    parser = argparse.ArgumentParser(prog="edgeq", description="Open deployment compiler toolchain for edge NPUs.")
    parser.add_argument("--version", action="version", version=f"edgeq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    targets = commands.add_parser("targets", help="list the targets, a line each")
    targets.add_argument("--markdown", action="store_true", help="print the supported-ops page (docs/supported-ops.md)")
    targets.set_defaults(run=_targets)

    quantized_model = _model_arguments(  # what check and compile take
        "QDQ ONNX file, or TorchScript file saved by edgeq",
        "target name or .toml file (default: the target the model was quantized for)",
    )

    check = commands.add_parser(
        "check",
        parents=[quantized_model],
        help="where each op runs on a target, why, and advice",
        description="Report, op by op, what the target's NPU runs, what falls back to the CPU and why. "
        "Exit status 4 when an op cannot run at all.",
    )
    check.add_argument("--json", type=_path, help="also write the report as JSON to this path ('-' for standard output)")
    check.add_argument("--no-advice", action="store_true", help="leave out advice")
    check.set_defaults(run=_check)

    compile_ = commands.add_parser(
        "compile",
        parents=[quantized_model],
        help="compile a quantized model into one .edgeq artifact",
        description="Compile a QDQ ONNX file or an edgeq TorchScript file for a target. NPU regions run as a "
        "bit-exact simulation on the NPU's host CPU; --simulate builds for this machine instead.",
    )
    compile_.add_argument("-o", "--output", type=_path, help="artifact path (default: MODEL with .edgeq)")
    compile_.add_argument("-O", dest="opt_level", type=int, default=2, choices=(0, 1, 2), help="optimisation level (default 2)")
    compile_.add_argument("--input-shape", type=_shape, action=_InputShapes, metavar="NAME=1x3x224x224",
                          help="static shape of an input with dynamic dimensions (repeatable)")
    compile_.add_argument("--simulate", action="store_true", help="build for this machine instead of the target's CPU")
    compile_.add_argument("--tuning-records", type=_path, metavar="DIR",
                          help="tuning records from `edgeq tune -o DIR` (default: the target's and CPU's records, if tuned)")
    compile_.add_argument("--untuned", action="store_true", help="default schedules only, whatever tuning records exist")
    compile_.set_defaults(run=_compile)

    export = commands.add_parser(
        "export",
        help="write a quantized model in another format (TOSA, for Arm's Vela and the Ethos-U NPUs)",
        description="Write the integer region of a QDQ ONNX file or an edgeq TorchScript file as a TOSA 1.0 "
        "flatbuffer (profile PRO-INT): int8 inputs after QuantStub, outputs before DeQuantStub, 4-D tensors NHWC. "
        "The model must be quantized for a target whose arithmetic rounds half up (an Ethos-U target).",
    )
    export.add_argument("model", type=_path, help="QDQ ONNX file, or TorchScript file saved by edgeq")
    export.add_argument("--format", required=True, choices=("tosa",), help="the format to write")
    export.add_argument("-o", "--output", type=_path, required=True, help="the file to write")
    export.set_defaults(run=_export)

    tune = commands.add_parser(
        "tune",
        parents=[quantized_model],
        help="search faster schedules for a model's kernels (MetaSchedule); compile uses them",
        description="Measure schedules of the model's int8 convolution and dense kernels with MetaSchedule, on this "
        "machine or on boards behind a TVM RPC tracker, and keep the best in tuning records per target and CPU "
        "(default: in edgeq's cache, where `edgeq compile` finds them by itself). Every schedule computes the same "
        "numbers; only the speed differs. Tuning again adds to the records.",
    )
    tune.add_argument("--budget", type=_minutes, default=10.0, metavar="MINUTES", help="wall-clock budget (default 10)")
    tune.add_argument("-o", "--output", type=_path, metavar="DIR", help="folder of the tuning records (default: edgeq's cache)")
    tune.add_argument("--rpc", metavar="HOST:PORT", help="measure on boards of this TVM RPC tracker")
    tune.add_argument("--key", help="the tracker key of the boards to measure on (with --rpc)")
    tune.add_argument("--input-shape", type=_shape, action=_InputShapes, metavar="NAME=1x3x224x224",
                      help="static shape of an input with dynamic dimensions (repeatable)")
    tune.add_argument("--simulate", action="store_true", help="tune the build for this machine instead of the target's CPU")
    tune.set_defaults(run=_tune)

    run = commands.add_parser(
        "run",
        help="run an artifact on .npy inputs",
        description="Run a .edgeq artifact and write each output as OUTPUT_DIR/<name>.npy. Float inputs are "
        "quantized per the manifest, inputs of the program's integer dtype are taken raw. An aarch64 artifact runs "
        "under qemu-aarch64 with the C++ runtime; NPU regions run as a bit-exact simulation.",
    )
    run.add_argument("model", type=_path, help=".edgeq artifact")
    run.add_argument("--input", action="append", metavar="[NAME=]FILE.npy", help="an input, in order or by name (repeatable)")
    run.add_argument("--output-dir", type=_path, required=True, help="folder for the outputs")
    run.add_argument("--runtime", choices=("python", "cpp"), default="python", help="which runtime (default: python)")
    run.add_argument("--bench", type=_count, metavar="N", help="also time N runs (median, min)")
    run.add_argument("--threads", type=_count, metavar="N", help="threads for inference (default: every core)")
    run.add_argument("--raw", action="store_true", help="write the integer outputs, not dequantized")
    run.set_defaults(run=_run)

    any_model = _model_arguments(  # what perf and visualize take: artifacts too
        ".edgeq artifact, QDQ ONNX file, or TorchScript file saved by edgeq (compiled first)",
        "target to compile a model for (default: the one it was quantized for); an artifact keeps its own",
    )

    perf = commands.add_parser(
        "perf",
        parents=[any_model],
        help="estimate latency layer by layer; write report.json and report.html",
        description="Estimate how fast the compiled model runs on its target, layer by layer, without a board, and "
        "write OUTPUT/report.json and OUTPUT/report.html (summary, where the time goes, a sortable layer table with "
        "the check's reasons, the compiled graph). CPU figures are measured on this machine the first time (cached).",
    )
    perf.add_argument("-o", "--output", type=_path, required=True, metavar="DIR", help="folder for report.json and report.html")
    perf.add_argument("--recalibrate", action="store_true", help="measure this machine's CPU figures again")
    perf.set_defaults(run=_perf)

    visualize = commands.add_parser(
        "visualize",
        parents=[any_model],
        help="draw the compiled graph as SVG",
        description="Draw the model as the compiler sees it: fused ops with shapes, dtypes and scales, coloured by "
        "placement (NPU, CPU integer, CPU float), regions as clusters, tensor sizes on the edges and NPU<->CPU "
        "transitions in red. Needs Graphviz's dot program.",
    )
    visualize.add_argument("-o", "--output", type=_path, metavar="GRAPH.svg", help="SVG path (default: MODEL with .svg)")
    visualize.set_defaults(run=_visualize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    console = Console(stderr=args.__dict__.get("json") == STANDARD_OUTPUT)
    try:
        if "model" in args:
            readable_file(args.model)
        return args.run(args, console)
    except EdgeqError as error:
        return _error(args.command, str(error))
    except OSError as error:  # one the library did not foresee: still one line, naming the file
        return _error(args.command, _os_error_line(error))


def _os_error_line(error: OSError) -> str:
    """``<file>: <reason>`` (``<file> -> <file2>: <reason>`` for a rename, ``<reason>`` alone when it names none)."""
    files = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    reason = error.strerror or str(error)
    return f"{files}: {reason}" if files else reason


def _error(command: str, message: str) -> int:
    """Print ``edgeq <command>: error: <message>`` on standard error; the exit status of an error."""
    _say(Console(stderr=True), f"edgeq {command}: error: {message}")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
