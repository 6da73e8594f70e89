"""What every engine runner of the peer benchmark shares (issue 34): its command line, the model it is handed and
the timed loop. Each runner is a script in this folder run by its engine's own Python, one process per measurement:

    python run_<engine>.py prepare --folder DIR --model NAME [--tune MINUTES]    # writes its file, prints the path
    python run_<engine>.py run --file PATH --input X.npy --warmup W --runs R --threads T    # prints one JSON line

The driver (benchmarks/peers.py) leaves in DIR, per model: ``NAME.pt`` (the float torchvision model's state_dict,
10 classes), ``NAME-calibration.npy`` (calibration batches, stacked) and ``NAME-input.npy`` (the measured input).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

from cpu_load import busy_cores, cpu_times, own_cpu_s

NUM_CLASSES = 10


def torchvision_models() -> types.ModuleType:
    """``torchvision.models``. Where torchvision's package cannot load (the peers' environments: the registry's
    torchvision for their CPU torch is a CUDA build, whose compiled ops fail there), the package's own
    ``__init__`` is skipped: the classifiers' definitions are plain Python and need none of those ops."""
    try:
        return importlib.import_module("torchvision.models")
    except RuntimeError:  # "operator torchvision::nms does not exist", from registering the compiled ops
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models")


def float_model(folder: Path, name: str) -> object:
    """The driver's float torchvision model ``name`` (eval mode), its weights loaded from ``folder``."""
    import torch

    model = getattr(torchvision_models(), name)(num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True))
    return model.eval()


def calibration_batches(folder: Path, name: str) -> list[object]:
    """The driver's calibration batches for ``name``, as torch tensors of batch 1."""
    import numpy as np
    import torch

    return [torch.from_numpy(batch) for batch in np.load(folder / f"{name}-calibration.npy")]


MIN_WINDOW_S = 1.0
"""The timed runs go on past ``runs`` until this long has passed: /proc/stat counts in ticks of 10 ms per CPU, so
that a shorter window could not tell 0.1 core of other load from none (over 1 s, to about 0.02 core)."""


def timed_runs(call: Callable[[], object], warmup: int, runs: int) -> dict[str, object]:
    """``warmup`` untimed calls, then timed ones back to back, at least ``runs`` and :data:`MIN_WINDOW_S` long:
    the milliseconds of each, and the cores other processes kept busy meanwhile (this process's own CPU time taken
    out)."""
    for _ in range(warmup):
        call()
    times_ms = []
    before, own_before, started = cpu_times(), own_cpu_s(), time.perf_counter()
    while len(times_ms) < runs or time.perf_counter() - started < MIN_WINDOW_S:
        run_started = time.perf_counter()
        call()
        times_ms.append((time.perf_counter() - run_started) * 1000)
    wall_s = time.perf_counter() - started
    other = busy_cores(before, cpu_times(), wall_s, own_cpu_s() - own_before)
    return {"times_ms": times_ms, "other_cores": other}


def main(prepare: Callable[..., Path], load: Callable[[Path, int, object], Callable[[], object]], tunable: bool = False) -> None:
    """A runner's command line. ``prepare(folder, model)`` writes the engine's file and returns its path (with
    ``tunable``, ``prepare(folder, model, tune_minutes)``, None for the default schedules); ``load(file, threads,
    x)`` returns the engine's inference on the float32 input array ``x``, as a call that is what gets timed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the engine's file for a model")
    prep.add_argument("--folder", type=Path, required=True)
    prep.add_argument("--model", required=True)
    if tunable:
        prep.add_argument("--tune", type=float, metavar="MINUTES", help="tune for this long first")
    run = commands.add_parser("run", help="time the engine on one input; prints one JSON line")
    run.add_argument("--file", type=Path, required=True)
    run.add_argument("--input", type=Path, required=True)
    run.add_argument("--warmup", type=int, default=10)
    run.add_argument("--runs", type=int, default=30, help="timed runs at least (see MIN_WINDOW_S)")
    run.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "prepare":
        print(prepare(args.folder, args.model, args.tune) if tunable else prepare(args.folder, args.model))
        return
    import numpy as np

    infer = load(args.file, args.threads, np.load(args.input))
    print(json.dumps(timed_runs(infer, args.warmup, args.runs)))
