"""Tutorial: your own torchvision model from float to a deployed, measured artifact (the README's tutorial).

MobileNetV3-Small (random init here: load your trained weights instead) takes raw uint8 camera pixels through
``QuantStub(scale=1/128)``: the float model sees ``(pixel - 128) / 128``, the compiled program ``pixel - 128`` as
int8, with no arithmetic. It is calibrated on generated images (use a few hundred of your own), converted to the
integer model, checked, compiled for this machine (x86_64), run with edgeq_runtime on raw pixels (the result must
equal the integer model's, bit for bit) and timed with the runtime's benchmark.

    python examples/deploy_torchvision.py [--size 224] [--out build/tutorial]

The README's tutorial section is the code between the ``tutorial`` markers; tests/test_examples.py checks that the
two are the same and runs this file at a small size.
"""

from __future__ import annotations

import argparse

# tutorial: start
from pathlib import Path

import numpy as np
import torch
import torchvision

from edgeq.check import check_model
from edgeq.compile import compile_model
from edgeq.quantization import DeQuantStub, QuantStub, calibrate, convert_fx
from edgeq_runtime import Model


class Deployable(torch.nn.Module):
    """Raw uint8 pixels in (``pixel - 128`` as int8 on the device), float logits out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.quant, self.model, self.dequant = QuantStub(scale=1 / 128), model, DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.model(self.quant(x)))


def camera_pixels(count: int, size: int) -> torch.Tensor:
    """Stand-in for your images: uint8 RGB, ``count`` x 3 x ``size`` x ``size``."""
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """What the float model takes: ``(pixel - 128) / 128``."""
    return (pixels.float() - 128) / 128


def deploy(size: int = 224, out: Path = Path("build/tutorial")) -> None:
    float_model = Deployable(torchvision.models.mobilenet_v3_small())  # your model (and weights) here
    with torch.no_grad():  # random init only: give BatchNorm the statistics training would (skip with weights)
        float_model.train()(normalise(camera_pixels(8, size)))
    float_model.eval()
    example = (normalise(camera_pixels(1, size)),)
    report = check_model(float_model, example, target="x86_64")  # can every op be quantized? where does it run?
    print(report.summary.verdict)
    if not report.deployable:
        raise SystemExit(str(report))

    batches = (normalise(camera_pixels(4, size)) for _ in range(8))  # a few batches of your data
    int_model = convert_fx(calibrate(float_model, batches, example_inputs=example, target="x86_64"))

    # this machine's CPU and its fastest int8 dot product; target="x86_64" builds a portable x86-64-v3 artifact
    compiled = compile_model(int_model, example, target="x86_64-native", out=out / "model.edgeq", progress=print)
    print("\n".join(compiled.summary_lines()))

    pixels = camera_pixels(1, size)
    raw = (pixels.numpy().astype(np.int16) - 128).astype(np.int8)  # what the device gets: pixel - 128
    with Model.load(compiled.artifact) as model:  # on the device: only edgeq_runtime, numpy and TVM's runtime
        logits = model.run(raw, raw=True)["dequant"]
        expected = int_model.run_integer(normalise(pixels)).numpy()  # the integer model: the reference
        print(f"the artifact equals the integer model: {np.array_equal(logits, expected)} "
              f"({logits.size} {logits.dtype} logits from {logits.min()} to {logits.max()})")
        print(model.benchmark(raw))
# tutorial: end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="image height and width (default: 224)")
    parser.add_argument("--out", type=Path, default=Path("build/tutorial"), help="folder for the artifact")
    args = parser.parse_args()
    torch.manual_seed(0)
    deploy(args.size, args.out)


if __name__ == "__main__":
    main()
