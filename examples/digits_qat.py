"""The seed's staged QAT flow on real data: float -> calib -> qat -> int_infer -> compile.

Data: scikit-learn's handwritten digits (1797 images of 8x8 pixels, shipped inside the package), as uint8
pixels. The model's ``QuantStub(scale=1/128)`` takes inputs normalised as ``(pixel - 128) / 128``, so on the NPU
the raw pixels enter as ``pixel - 128`` with no arithmetic; the final classifier keeps an int32 output.

Each stage saves a checkpoint in ``--workdir`` and the next one starts from it, as in the seed::

    python examples/digits_qat.py --stage float
    python examples/digits_qat.py --stage calib
    python examples/digits_qat.py --stage qat
    python examples/digits_qat.py --stage int_infer
    python examples/digits_qat.py --stage compile
    python examples/digits_qat.py              # all five in order
    python examples/digits_qat.py --model se   # the same with Hardswish / SiLU and squeeze-and-excitation
    python examples/digits_qat.py --model pads # zero pads, one shared SiLU, a linear layer with BatchNorm1d
    python examples/digits_qat.py --nproc 2    # calib and qat in 2 processes with DistributedDataParallel

With ``--nproc N`` the calib and qat stages run in N processes (torch.distributed's gloo backend on 127.0.0.1,
started by the script itself; docs/training.md): every process draws the same batches and takes every N-th image
of each, calibration ranges are combined over the processes, QAT trains the model wrapped in
DistributedDataParallel, and process 0 saves the checkpoint.

The compile stage saves ``int_model.pt`` (TorchScript) and ``model.onnx`` (QDQ), prints the target check, compiles
``digits.edgeq`` for the target's board (aarch64) and ``digits-x86_64.edgeq`` for this machine, measures the
artifact's accuracy with the Python runtime and checks that every artifact equals the integer model (Python
runtime on every test image; C++ runtime on one, the aarch64 artifact under qemu), and, as the seed ends,
estimates the board's latency (``perf/report.json`` and ``perf/report.html``, with each layer's accuracy against
the float model) and draws the compiled graph (``model.svg``).

On an Arm Ethos-U target (``--target ethos-u65-256``: one whose file has a ``[vela]`` section) the compile stage
also writes ``model.tosa`` (the integer model as TOSA 1.0), checks that the TOSA reference model equals the integer
model on every test image (its logits in ``tosa-reference.npy``) and prints Vela's estimate of each NPU region.
A target whose host is a microcontroller running your firmware (``ethos-u55-128``: ``firmware_host``) gets no
board library: every op runs on the NPU, and ``digits-x86_64.edgeq`` simulates it on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from edgeq.quantization import (
    DeQuantStub,
    FakeQuantState,
    IntegerModel,
    QuantStub,
    convert_fx,
    default_calib_int32_output_qconfig,
    default_calib_qconfig,
    default_qat_int32_output_qconfig,
    default_qat_qconfig,
    prepare_qat_fx,
    set_fake_quantize,
)
from edgeq.quantization.distributed import is_distributed, synchronize_ranks

if TYPE_CHECKING:
    from edgeq.compile import CompileResult
    from edgeq.targets import Target

STAGES = ("float", "calib", "qat", "int_infer", "compile")


class DigitsNet(nn.Module):
    """A small residual CNN for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.classifier = nn.Linear(32, 10)
        self.dequant = DeQuantStub()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.quant(pixels)
        x = self.stem(x)
        x = self.join(x + self.block(x))
        x = self.head(self.pool(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.dequant(self.classifier(x))

    @staticmethod
    def join(x: torch.Tensor) -> torch.Tensor:
        """The activation after the residual add."""
        return F.relu(x)


class SqueezeExcite(nn.Module):
    """Channel attention: ``x * torch.sigmoid(expand(relu(reduce(pool(x)))))``."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(self.pool(x)))))


class DigitsSENet(DigitsNet):
    """DigitsNet with Hardswish and SiLU activations and squeeze-and-excitation ending the residual branch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), SqueezeExcite(16, 8),
        )
        self.head = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())

    @staticmethod
    def join(x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class DigitsPadsNet(DigitsNet):
    """DigitsNet with each conv's padding a zero pad of its own (``nn.ZeroPad2d``, ``F.pad``), one ``nn.SiLU``
    instance after every conv and the residual add (as ultralytics' ``Conv`` shares its ``default_act``), and a
    hidden linear layer with BatchNorm1d (folded into it) before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.stem = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 16, 3, bias=False), nn.BatchNorm2d(16), self.act)
        self.block = nn.Sequential(
            nn.ZeroPad2d(1), nn.Conv2d(16, 16, 3, bias=False), nn.BatchNorm2d(16), self.act,
            nn.ZeroPad2d(1), nn.Conv2d(16, 16, 3, bias=False), nn.BatchNorm2d(16),
        )
        self.head = nn.Sequential(nn.Conv2d(16, 32, 3, bias=False), nn.BatchNorm2d(32), self.act)
        self.hidden = nn.Sequential(nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), self.act)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.quant(pixels))
        x = self.join(x + self.block(x))
        x = self.head(F.pad(self.pool(x), (1, 1, 1, 1)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.dequant(self.classifier(self.hidden(x)))

    def join(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


NETWORKS: dict[str, type[DigitsNet]] = {"cnn": DigitsNet, "se": DigitsSENet, "pads": DigitsPadsNet}
"""The networks ``--model`` chooses from."""


def load_pixels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 pixels [N, 1, 8, 8] and labels, split 70/30 into train and test (fixed seed)."""
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, digits.target, test_size=0.3, random_state=seed, stratify=digits.target
    )
    return (torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x), torch.from_numpy(test_y))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to the float input of the model: (pixel - 128) / 128, exactly representable at scale 1/128."""
    return (pixels.to(torch.float32) - 128.0) / 128.0


def raw_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as the NPU receives them: ``pixel - 128`` in int8 (the quantized input at scale 1/128)."""
    return (pixels.to(torch.int16) - 128).to(torch.int8)


def batches(pixels: torch.Tensor, labels: torch.Tensor, size: int, shuffle: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(pixels)) if shuffle else torch.arange(len(pixels))
    for start in range(0, len(pixels), size):
        index = order[start : start + size]
        yield pixels[index], labels[index]


def rank_share(tensor: torch.Tensor) -> torch.Tensor:
    """This process's share of a batch under torch.distributed (every N-th image), the whole batch otherwise."""
    return tensor[dist.get_rank() :: dist.get_world_size()] if is_distributed() else tensor


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, raw_int8: bool = False) -> float:
    """Top-1 accuracy in percent. ``raw_int8`` feeds ``pixel - 128`` as int8, as the NPU receives it."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches(pixels, labels, 256, shuffle=False):
            inputs = raw_pixels(x) if raw_int8 else normalise(x)
            correct += int((model(inputs).argmax(1) == y).sum())
    return 100.0 * correct / len(pixels)


def train(model: nn.Module, data: tuple, epochs: int, optimizer: torch.optim.Optimizer, stage: str) -> None:
    train_x, train_y, test_x, test_y = data
    for epoch in range(epochs):
        model.train()
        if stage == "qat":
            set_fake_quantize(model, FakeQuantState.QAT)
        total = 0.0
        for x, y in batches(train_x, train_y, 64, shuffle=True):
            x, y = rank_share(x), rank_share(y)
            loss = F.cross_entropy(model(normalise(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(x)
        model.eval()
        if stage == "qat":
            set_fake_quantize(model, FakeQuantState.VALIDATION)
        if epoch % 5 == 4 or epoch == epochs - 1:
            test_accuracy = accuracy(model, test_x, test_y)  # every process: a DDP forward is a collective
            if is_main_process():
                print(f"  {stage} epoch {epoch + 1}/{epochs}: loss {total / len(train_x):.4f}, test accuracy {test_accuracy:.2f}%")


def float_model(workdir: Path, trained: bool, network: str = "cnn") -> DigitsNet:
    model = NETWORKS[network]()
    if trained:
        model.load_state_dict(torch.load(workdir / "float-checkpoint.pt"))
    return model.eval()


def example_input() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)


def calib_model(workdir: Path, target: str, network: str = "cnn") -> torch.fx.GraphModule:
    qconfig = {"": default_calib_qconfig, "module_name": {"classifier": default_calib_int32_output_qconfig}}
    model = float_model(workdir, True, network)
    return prepare_qat_fx(model, qconfig, example_inputs=(example_input(),), target=target)


def qat_model(workdir: Path, target: str, network: str = "cnn") -> torch.fx.GraphModule:
    qconfig = {"": default_qat_qconfig, "module_name": {"classifier": default_qat_int32_output_qconfig}}
    model = float_model(workdir, True, network)
    return prepare_qat_fx(model, qconfig, example_inputs=(example_input(),), target=target)


def quantization_stage(stage: str, workdir: Path, target: str, data: tuple, network: str) -> torch.fx.GraphModule:
    """The calib or qat stage in this process (one process of a torch.distributed group, or alone): returns the
    model and saves its checkpoint (process 0)."""
    train_x, train_y = data[0], data[1]
    if stage == "calib":
        model = calib_model(workdir, target, network).eval()
        set_fake_quantize(model, FakeQuantState.CALIBRATION)
        with torch.no_grad():
            for x, _ in batches(train_x, train_y, 128, shuffle=False):
                model(normalise(rank_share(x)))
        set_fake_quantize(model, FakeQuantState.VALIDATION)  # under torch.distributed: the ranges of every process
    else:
        model = qat_model(workdir, target, network)
        model.load_state_dict(torch.load(workdir / "calib-checkpoint.pt"))
        trained = DistributedDataParallel(model) if is_distributed() else model
        optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        train(trained, data, epochs=5, optimizer=optimizer, stage=stage)
        synchronize_ranks(model)  # the observers of every process, BatchNorm statistics of process 0
    if is_main_process():
        torch.save(model.state_dict(), workdir / f"{stage}-checkpoint.pt")
    return model


def stage_process(rank: int, nproc: int, port: int, stage: str, workdir: Path, target: str, data: tuple, network: str, rng: torch.Tensor) -> None:
    """One of ``nproc`` processes running ``stage``, started by ``torch.multiprocessing.spawn``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc)
    torch.set_rng_state(rng)  # every process draws the batches the single process would
    try:
        quantization_stage(stage, workdir, target, data, network)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_stage(
    stage: str, workdir: Path, target: str, data: tuple, results: dict[str, float], network: str = "cnn", nproc: int = 1
) -> None:
    train_x, train_y, test_x, test_y = data
    started = time.perf_counter()
    print(f"== stage {stage} (target {target})")
    if stage == "float":
        model = float_model(workdir, trained=False, network=network)
        train(model, data, epochs=40, optimizer=torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4), stage=stage)
        torch.save(model.state_dict(), workdir / "float-checkpoint.pt")
        results["float"] = accuracy(model, test_x, test_y)
    elif stage in ("calib", "qat"):
        if nproc > 1:
            port = free_port()
            torch.multiprocessing.spawn(stage_process, (nproc, port, stage, workdir, target, data, network, torch.get_rng_state()), nproc)
            model = calib_model(workdir, target, network) if stage == "calib" else qat_model(workdir, target, network)
            model.load_state_dict(torch.load(workdir / f"{stage}-checkpoint.pt"))
            set_fake_quantize(model, FakeQuantState.VALIDATION)
        else:
            model = quantization_stage(stage, workdir, target, data, network)
        results[stage] = accuracy(model, test_x, test_y)
    elif stage == "int_infer":
        integer = int_model(workdir, target, network)
        results["int_infer"] = accuracy(integer, test_x, test_y)
        results["int_infer_raw_pixels"] = accuracy(integer, test_x, test_y, raw_int8=True)
    else:
        integer = int_model(workdir, target, network)
        results["compile"] = compile_stage(integer, workdir, target, test_x, test_y, network)
    print(f"   {stage}: test accuracy {results.get(stage, 0.0):.2f}% ({time.perf_counter() - started:.1f} s)")


def int_model(workdir: Path, target: str, network: str = "cnn") -> IntegerModel:
    """The integer model of the QAT checkpoint."""
    model = qat_model(workdir, target, network)
    model.load_state_dict(torch.load(workdir / "qat-checkpoint.pt"))
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    return convert_fx(model.eval())


def compile_stage(
    integer: IntegerModel, workdir: Path, target: str, test_x: torch.Tensor, test_y: torch.Tensor, network: str
) -> float:
    """Export, check, compile for the board and for this machine, run every artifact with both runtimes and compare
    it with the integer model (and, for an Ethos-U target, with the TOSA reference model and Vela's estimate), then
    the perf report and the graph; the artifact's accuracy on the test set."""
    from edgeq.check import check_model
    from edgeq.compile import compile_model
    from edgeq.export import save_torchscript, to_onnx
    from edgeq.targets import load_target

    example = (normalise(test_x[:1]),)
    save_torchscript(integer, example, workdir / "int_model.pt")
    onnx_path = to_onnx(integer, example, workdir / "model.onnx")
    report = check_model(onnx_path, target=target)
    print("\n".join(f"  check: {line}" for line in report.summary_lines()))
    resolved = load_target(target)

    def progress(line: str) -> None:
        print(f"  compile: {line}")

    board = None
    if resolved.firmware_host is None:
        board = compile_model(onnx_path, out=workdir / "digits.edgeq", progress=progress)
    here = compile_model(onnx_path, out=workdir / "digits-x86_64.edgeq", simulate=True, progress=progress if board is None else lambda line: None)
    if board is not None:
        print(f"  compiled {board.artifact.name} ({board.arch}) and {here.artifact.name} ({here.arch}); "
              f"{board.report.summary.verdict}; {sum(board.seconds.values()):.1f} s")
    else:
        print(f"  compiled {here.artifact.name} ({here.arch}); {here.report.summary.verdict}; {sum(here.seconds.values()):.1f} s; "
              f"no board library: {resolved.name}'s host is a {resolved.firmware_host} running your firmware, which edgeq "
              f"builds no code for, so every op runs on the NPU and {here.artifact.name} simulates it on this machine")
    if resolved.vela is not None:
        tosa_stage(integer, workdir, test_x)
        vela_stage(here, resolved)
    correct = compare_artifacts(integer, board.artifact if board else None, here.artifact, workdir, test_x, test_y)
    perf_stage((board or here).artifact, integer, workdir, normalise(test_x[:64]), float_model(workdir, True, network))
    return 100.0 * correct / len(test_x)


def tosa_stage(integer: IntegerModel, workdir: Path, test_x: torch.Tensor) -> None:
    """Write the integer model as ``model.tosa`` (batch 1, NHWC input) and print whether the TOSA reference model,
    given every test image at once (the same graph at the test set's batch), equals the integer model; its logits
    go to ``tosa-reference.npy``."""
    from edgeq.export.tosa import to_tosa, tosa_graph
    from edgeq.export.tosa.reference import run_reference

    graph = to_tosa(integer, (normalise(test_x[:1]),), workdir / "model.tosa")
    print(f"  wrote model.tosa: TOSA 1.0, {len(graph.operators)} operators, input {graph.inputs[0].shape} NHWC, "
          f"output {graph.outputs[0].shape} {graph.outputs[0].dtype}")
    (reference,) = run_reference(tosa_graph(integer, (normalise(test_x),)), [raw_pixels(test_x).numpy()])
    np.save(workdir / "tosa-reference.npy", reference)
    expected = integer.run_integer(normalise(test_x)).numpy()
    print(f"  the integer model equals the TOSA reference model on all {len(test_x)} test images: "
          f"{bool(np.array_equal(reference, expected))}")


def vela_stage(compiled: CompileResult, target: Target) -> None:
    """Print Vela's summary of each NPU region compile wrote as a command stream (what the artifact stores): NPU
    cycles, inference time at the NPU's clock, memory used."""
    for stream in compiled.command_streams:
        summary, ops = stream.vela.summary, len(stream.ops)
        print(f"  vela: {stream.region} ({ops} op{'s' if ops != 1 else ''}) on {target.vela.accelerator_config}: "
              f"{summary.npu_cycles} NPU cycles ({summary.total_cycles} with memory access), {summary.inference_time_s * 1e3:.4f} ms at "
              f"{summary.clock_hz / 1e6:.0f} MHz, SRAM {summary.sram_bytes / 1024:.1f} KiB, DRAM "
              f"{summary.dram_bytes / 1024:.1f} KiB, flash {(summary.on_chip_flash_bytes + summary.off_chip_flash_bytes) / 1024:.1f} KiB "
              f"(Vela {stream.vela.version}; the command stream itself needs the device)")


def compare_artifacts(
    integer: IntegerModel, board: Path | None, here: Path, workdir: Path, test_x: torch.Tensor, test_y: torch.Tensor
) -> int:
    """Run this machine's artifact with the Python runtime on every test image and with the C++ runtime on one, and
    the board's aarch64 artifact (if any) with the C++ runtime under qemu; print whether each equals the integer
    model. Returns how many test images the Python runtime classified right."""
    from edgeq.run import run_artifact
    from edgeq_runtime import Model

    expected = integer.run_integer(normalise(test_x)).numpy()
    correct, same = 0, True
    with Model.load(here) as model:
        (output,) = model.outputs
        for index, (pixels, label) in enumerate(zip(test_x, test_y)):
            logits = model.run(raw_pixels(pixels[None]).numpy(), raw=True)[output.name]
            same &= bool(np.array_equal(logits, expected[index : index + 1]))
            correct += int(output.dequantize(logits).argmax() == int(label))
    print(f"  {here.name} with the Python runtime equals the integer model on all {len(test_x)} test images: {same}")
    np.save(workdir / "pixel0.npy", raw_pixels(test_x[:1]).numpy())
    for artifact, folder in ((here, "cpp-x86_64"), (board, "cpp-aarch64")):
        if artifact is None:
            continue
        result = run_artifact(artifact, [str(workdir / "pixel0.npy")], workdir / folder, "cpp", raw=True, say=lambda line: print(f"  run: {line}"))
        output = np.load(next(iter(result.outputs.values())))
        print(f"  {artifact.name} with the C++ runtime{' under qemu' if artifact == board else ''} equals the integer model: "
              f"{bool(np.array_equal(output, expected[:1]))}")
    return correct


def perf_stage(artifact: Path, integer: IntegerModel, workdir: Path, samples: torch.Tensor, trained: nn.Module) -> None:
    """The seed's last steps: perf_model (report.json, and report.html with each layer's accuracy against the
    ``trained`` float model) and visualize_model."""
    import edgeq

    result = edgeq.perf_model(artifact, (samples,), out_dir=workdir / "perf", float_model=trained, int_model=integer)
    graph = edgeq.visualize_model(artifact, save_path=workdir / "model.svg")
    worst = min(result.accuracy, key=lambda layer: layer.cosine)
    print(f"  perf: estimated {result.summary.latency_ms:.3f} ms per image on {result.target}; lowest layer cosine "
          f"{worst.cosine:.4f} ({worst.layer}); wrote {result.report_html} and {graph}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="stage to run (default: all, in order)")
    parser.add_argument("--target", default="npu-s", help="target whose quantization rules apply (default: npu-s)")
    parser.add_argument("--model", choices=NETWORKS, default="cnn",
                        help="cnn: the residual CNN (default); se: with Hardswish / SiLU and squeeze-and-excitation; "
                        "pads: with zero pads, one shared SiLU and a linear layer with BatchNorm1d")
    parser.add_argument("--workdir", type=Path, help="where checkpoints go (default: build/digits, build/digits-<model>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=1, help="processes for the calib and qat stages (DistributedDataParallel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    args.workdir = args.workdir or Path("build/digits" if args.model == "cnn" else f"build/digits-{args.model}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = load_pixels(args.seed)
    print(f"digits: {len(data[0])} train and {len(data[2])} test images, 8x8 uint8")
    results_file = args.workdir / "accuracy.json"
    results: dict[str, float] = json.loads(results_file.read_text()) if results_file.exists() else {}
    for stage in STAGES if args.stage == "all" else (args.stage,):
        run_stage(stage, args.workdir, args.target, data, results, args.model, args.nproc)
    results_file.write_text(json.dumps(results, indent=2))
    print("\nstage       test accuracy")
    for stage in ("float", "calib", "qat", "int_infer", "int_infer_raw_pixels", "compile"):
        if stage in results:
            label = "compile (the artifact)" if stage == "compile" else stage
            print(f"{label:<24}{results[stage]:6.2f}%")
    if "float" in results and "int_infer" in results:
        print(f"integer model vs float: {results['int_infer'] - results['float']:+.2f} points")
    if args.stage in ("all", "compile"):
        print(f"\nin {args.workdir}/: {', '.join(compiled_files(args.target))}")


def compiled_files(target: str) -> list[str]:
    """What the compile stage leaves in the work folder for ``target``, each with what it is."""
    from edgeq.targets import load_target

    resolved = load_target(target)
    files = ["int_model.pt and model.onnx (the integer model)"]
    if resolved.vela is not None:
        files.append("model.tosa (the integer model as TOSA, for Vela) and tosa-reference.npy (the TOSA reference model's logits)")
    if resolved.firmware_host is None:
        files.append(f"digits.edgeq (the {target} board's artifact, aarch64) and digits-x86_64.edgeq (this machine's)")
    else:
        files.append("digits-x86_64.edgeq (this machine's bit-exact simulation of the NPU)")
    return [*files, "perf/report.html and perf/report.json (the perf report with per-layer accuracy)", "model.svg (the compiled graph)"]


if __name__ == "__main__":
    main()
