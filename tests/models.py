"""Models and flows shared by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from edgeq.quantization import DeQuantStub, QuantStub, convert_fx, default_calib_qconfig
from edgeq.quantization import calibrate as edgeq_calibrate
from edgeq.quantization.integer_model import IntegerModel

FLOAT_REGION_STEPS = 1
"""docs/numerics.md "Float fallback": an output after a float region is within this many steps of the integer
model's..."""
FLOAT_REGION_SHARE = 0.999
"""...on at least this share of the values."""


def assert_within_float_region_bound(got: np.ndarray, expected: np.ndarray) -> None:
    """``got`` (integers after a float region) agrees with the integer model's ``expected`` within the bound."""
    steps = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    assert (steps <= FLOAT_REGION_STEPS).mean() >= FLOAT_REGION_SHARE, np.bincount(steps.ravel())


class SmallCNN(nn.Module):
    """A digits-sized CNN with a fixed-scale input, BN, residual add, pooling and an int8 classifier; ``width``
    channels (twice as many in the last convolution)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu = nn.ReLU6()
        self.fc = nn.Linear(2 * width, num_classes)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        x = self.relu(self.conv3(self.pool(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.dequant(self.fc(x))


class WideStride(nn.Module):
    """A 3x3 convolution, then a padded 5x5 convolution of stride 4, which Vela refuses on the U55 and U65."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.wide = nn.Conv2d(8, 8, 5, stride=4, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.wide(self.first(self.quant(x))))


class FunctionalOps(nn.Module):
    """Every functional spelling edgeq quantizes: +, torch.add, torch.cat, F.relu, pooling, flatten, mean..."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 8, 1)
        self.conv_c = nn.Conv2d(16, 8, 3, stride=2, padding=1, groups=8)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.fc = nn.Linear(8, 4)
        self.dequant = DeQuantStub()
        self.dequant_map = DeQuantStub()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.quant(x)
        a, b = self.conv_a(x), self.conv_b(x)
        s = torch.add(a, b)
        s = F.relu(s) + b
        c = torch.cat([s, F.relu6(a)], dim=1)
        c = F.max_pool2d(c, kernel_size=3, stride=1, padding=1)
        c = self.conv_c(c)
        c = F.avg_pool2d(c, 2)
        up = self.upsample(c)
        first, second = up.chunk(2, dim=1)
        mixed = torch.cat([second, first], 1).relu()
        pooled = mixed.mean((2, 3))
        return self.dequant(self.fc(pooled.flatten(1))), self.dequant_map(mixed.transpose(2, 3).contiguous())


class ForwardLinear(nn.Linear):
    """timm's ``Linear``: an ``nn.Linear`` subclass whose forward calls ``F.linear`` (torch.fx traces into it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class InheritedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` subclass outside torch.nn with its parent's forward: torch.fx traces into it (``F.conv2d``)."""


class Layers(nn.Module):
    """A conv (+BatchNorm, ReLU), a depthwise conv and a linear classifier, as torch.nn's layers or (``subclassed``)
    as the subclasses above; ``halves_listed``: the conv's output is split and concatenated again with
    ``list(x.chunk(2, 1))``, which only torch.export captures."""

    def __init__(self, subclassed: bool, halves_listed: bool = False) -> None:
        super().__init__()
        conv, linear = (InheritedConv2d, ForwardLinear) if subclassed else (nn.Conv2d, nn.Linear)
        self.halves_listed = halves_listed
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv, self.bn, self.relu = conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.depthwise = conv(8, 8, 3, stride=2, groups=8, bias=False)
        self.fc = linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(self.quant(x))))
        if self.halves_listed:
            x = torch.cat(list(x.chunk(2, 1)), 1)
        return self.dequant(self.fc(self.depthwise(x).mean((2, 3))))


class BilinearResizes(nn.Module):
    """Bilinear resizes of every kind edgeq computes in integers: a size with odd ratios, a factor of 2, a factor of
    1.5 that gives whole sizes, align_corners both ways (``nn.UpsamplingBilinear2d``), down to a smaller size, and
    ``nn.Upsample``; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.corners = nn.UpsamplingBilinear2d(scale_factor=2)
        self.upsample = nn.Upsample(scale_factor=1.5, mode="bilinear")
        self.dequant = DeQuantStub()
        self.dequant_small = DeQuantStub()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.conv(self.quant(x))
        b = F.interpolate(a, size=(13, 11), mode="bilinear")
        c = self.corners(F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False))
        small = F.interpolate(c, size=(5, 7), mode="bilinear", align_corners=True)
        return self.dequant(self.upsample(F.interpolate(a, size=(6, 4), mode="bilinear"))), self.dequant_small(small)


class GeluBlocks(nn.Module):
    """A ConvNeXt-style block (7x7 depthwise conv, BatchNorm, 1x1 expand, GELU, 1x1 project, residual) and a
    ViT-style MLP over its tokens (Linear, GELU in its tanh form, Linear, residual), then a classifier; 16x16
    inputs."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.stem = nn.Conv2d(3, channels, 2, stride=2)
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.BatchNorm2d(channels)
        self.expand, self.gelu, self.project = nn.Conv2d(channels, 4 * channels, 1), nn.GELU(), nn.Conv2d(4 * channels, channels, 1)
        self.fc1, self.fc2 = nn.Linear(channels, 2 * channels), nn.Linear(2 * channels, channels)
        self.head = nn.Linear(channels * 64, 10)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.quant(x))
        x = x + self.project(self.gelu(self.expand(self.norm(self.dwconv(x)))))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.fc2(F.gelu(self.fc1(tokens), approximate="tanh"))
        return self.dequant(self.head(tokens.flatten(1)))


class EluBlock(nn.Module):
    """Conv, ELU (alpha 1), conv, ``F.elu`` with alpha 0.5 (keyword), average pool, classifier; 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1, self.elu, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.conv2(self.elu(self.conv1(self.quant(x)))), alpha=0.5)
        return self.dequant(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class Clamps(nn.Module):
    """Every spelling of a clamp of constant bounds: ``nn.Hardtanh`` (-1, 1), ``F.hardtanh``, ``x.clamp`` and
    ``torch.clamp`` with one bound, ``torch.clip``; ``torch.clamp(x, min=0)`` after a conv (a ReLU: fused) and
    ``torch.clamp(x, 0, 6)`` (a ReLU6); 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1, self.hardtanh, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Hardtanh(), nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.hardtanh(self.conv1(self.quant(x))))
        x = torch.clamp(F.hardtanh(x, min_val=-0.3, max_val=0.7).clamp(min=-0.2), max=0.5) + torch.clip(x, -2.5, 0.9)
        return self.dequant(torch.clamp(torch.cat([torch.clamp(self.conv3(x), min=0), x], dim=1), 0, 6))


class Pads(nn.Module):
    """Every spelling of a pad with zeros: ``nn.ZeroPad2d`` of one side (HGNetV2's stem), ``nn.ConstantPad2d`` with
    0, ``F.pad`` of H and W before a max pool and a conv (timm's "same" padding), ``F.pad`` of the last axis only,
    and of the channels; ``halves_listed``: the input is split and concatenated again with ``list(x.chunk(2, 1))``,
    which only torch.export captures."""

    def __init__(self, halves_listed: bool = False) -> None:
        super().__init__()
        self.halves_listed = halves_listed
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1 = nn.Conv2d(4, 8, 3)
        self.zero_pad, self.constant_pad = nn.ZeroPad2d((0, 1, 0, 1)), nn.ConstantPad2d(1, 0.0)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        if self.halves_listed:
            x = torch.cat(list(x.chunk(2, 1)), 1)
        x = self.constant_pad(self.zero_pad(self.conv1(x)))
        x = F.max_pool2d(F.pad(x, (1, 1, 0, 2)), 2, 1)
        x = self.conv2(F.pad(x, [0, 1, 1, 0], mode="constant", value=0.0))
        return self.dequant(F.pad(F.pad(x, (2, 1)), (0, 0, 0, 0, 1, 2)))


class BatchNorms1d(nn.Module):
    """BatchNorm1d everywhere it can stand, on an (N, 4, 6) input: alone on (N, C, L) after the QuantStub, after a
    linear layer of a 3-D input (over L, so alone too), folded into a linear layer of a 2-D output with the ReLU after
    it, alone on (N, C) after that ReLU, and as ``F.batch_norm`` folded into the last linear layer (timm's
    BatchNormAct1d); gammas and betas drawn at random. ``halves_listed``: as in :class:`Pads` (torch.export)."""

    def __init__(self, halves_listed: bool = False) -> None:
        super().__init__()
        self.halves_listed = halves_listed
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.norm_sequence = nn.BatchNorm1d(4)
        self.mix = nn.Linear(6, 8)
        self.norm_mixed = nn.BatchNorm1d(4)
        self.fc1, self.norm_fc1 = nn.Linear(32, 12), nn.BatchNorm1d(12)
        self.norm_alone = nn.BatchNorm1d(12)
        self.fc2, self.norm_fc2 = nn.Linear(12, 10), nn.BatchNorm1d(10)
        with torch.no_grad():
            for norm in (self.norm_sequence, self.norm_mixed, self.norm_fc1, self.norm_alone, self.norm_fc2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        if self.halves_listed:
            x = torch.cat(list(x.chunk(2, 1)), 1)
        x = self.norm_mixed(self.mix(self.norm_sequence(x)))
        x = self.norm_alone(F.relu(self.norm_fc1(self.fc1(x.flatten(1)))))
        norm = self.norm_fc2
        return self.dequant(F.batch_norm(self.fc2(x), norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.1, norm.eps))


class DataMovement(nn.Module):
    """Data movement of vision transformers and their kin, on 8x8 maps of 8 channels: Swin's window partition and
    its reverse (reshape / permute over six axes), its shifted windows (``torch.roll``), a roll of the flattened
    tensor (no ``dims``), ``unbind``, ``narrow``, ``split`` with sizes, indexing with constant slices and a
    slice of a tuple of chunks concatenated; ``halves_listed``: the input is split and concatenated again with
    ``list(x.chunk(2, 1))``, which only torch.export captures."""

    def __init__(self, halves_listed: bool = False) -> None:
        super().__init__()
        self.halves_listed = halves_listed
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.quant(x))
        if self.halves_listed:
            x = torch.cat(list(x.chunk(2, 1)), 1)
        x = torch.cat(x.chunk(2, 1)[::-1], 1)  # a slice of the tuple of chunks: the halves swapped
        n, c, h, w = x.shape
        shifted = torch.roll(x.permute(0, 2, 3, 1), shifts=(-2, -2), dims=(1, 2))
        windows = shifted.reshape(n, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 4, c)
        merged = windows.reshape(n, h // 4, w // 4, 4, 4, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
        x = torch.roll(merged, 2, 3)
        first, rest = torch.split(x, [3, 5], dim=1)
        rows = rest.unbind(2)
        picked = torch.roll(torch.cat([rows[1], rows[-1], rest.narrow(3, 2, 4)[:, :, 0]], 2), 11)
        tail = torch.cat([first[:, 1:, 3], first[:, 1:, -3], first[:, 1:, 0, 2:6]], 2)
        return self.dequant(torch.cat([picked, tail], 1))


TOKENS, DIM, HEADS = 5, 12, 3
"""AttentionBlock's tokens, their dimensions and its heads: odd sizes."""


class AttentionBlock(nn.Module):
    """A tiny ViT block: qkv Linear, ``q @ k^T`` per batch and head, times the head scale and softmax (both float
    fallback), ``@ v``, the heads merged and a Linear; the scores leave through a DeQuantStub of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.scale = (DIM // HEADS) ** -0.5
        self.dequant = DeQuantStub()
        self.dequant_scores = DeQuantStub()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.quant(x)
        q, k, v = self.qkv(x).reshape(-1, TOKENS, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1)
        attention = (scores * self.scale).softmax(dim=-1)
        mixed = torch.matmul(attention, v).transpose(1, 2).reshape(-1, TOKENS, DIM)
        return self.dequant(self.proj(mixed)), self.dequant_scores(scores)


class Wrapped(nn.Module):
    """A torchvision model between a QuantStub and a DeQuantStub."""

    def __init__(self, model: nn.Module, scale: float | None = None) -> None:
        super().__init__()
        self.quant = QuantStub(scale=scale)
        self.model = model
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.model(self.quant(x)))


class SegmentationMap(nn.Module):
    """A torchvision segmentation model's ``out`` map (the model itself returns a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


class ConvBnSiLU(nn.Module):
    """YOLOv8's ``Conv``: a bias-free conv, BatchNorm and SiLU, padded to keep the size at stride 1."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class GroupedBlock(nn.Module):
    """RegNet's block, small: a 1x1 convolution, a grouped 3x3 (``group_width`` channels a group, stride 2) and a
    1x1, added to a projection shortcut (a strided 1x1 convolution of the block's input, first in the graph), then
    ReLU."""

    def __init__(self, channels: int = 24, group_width: int = 4) -> None:
        super().__init__()

        def conv_bn(kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
            layers = [nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=groups), nn.BatchNorm2d(channels)]
            return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

        self.quant = QuantStub()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.proj = conv_bn(1, stride=2, relu=False)
        self.a, self.b, self.c = conv_bn(1), conv_bn(3, stride=2, groups=channels // group_width), conv_bn(1, relu=False)
        self.relu = nn.ReLU()
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.quant(x))
        return self.dequant(self.relu(self.proj(x) + self.c(self.b(self.a(x)))))


class SqueezeExcitationBlock(nn.Module):
    """MobileNetV3's block, small: a depthwise 3x3 with Hardswish, squeeze-and-excitation (average pool, two 1x1
    convolutions, Hardsigmoid, the product with the block's tensor), a 1x1 projection."""

    def __init__(self, channels: int = 24) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels), nn.Hardswish()
        )
        self.excite = torchvision.ops.SqueezeExcitation(channels, channels // 3, scale_activation=nn.Hardsigmoid)
        self.project = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.project(self.excite(self.depthwise(self.stem(self.quant(x))))))


class Bottleneck(nn.Module):
    """YOLOv8's bottleneck: two 3x3 ConvBnSiLU, with a residual add when ``shortcut``."""

    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = ConvBnSiLU(channels, channels, 3)
        self.cv2 = ConvBnSiLU(channels, channels, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's C2f, written as Ultralytics writes it: iterating over the chunks (torch.fx cannot trace that)."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBnSiLU(c_in, 2 * self.c)
        self.cv2 = ConvBnSiLU((2 + n) * self.c, c_out)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """YOLOv8's spatial pyramid pooling (fast): one 5x5 max pool applied three times in a row, the four maps
    concatenated."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.cv1 = ConvBnSiLU(c_in, c_in // 2)
        self.cv2 = ConvBnSiLU(c_in // 2 * 4, c_out)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloStyleDetector(nn.Module):
    """A YOLOv8-style detector, a few channels wide: stride-2 ConvBnSiLU stem, C2f stages, SPPF, a nearest 2x
    upsampling concatenated with the stride-8 map, a C2f neck and a 1x1 head with sigmoid scores (stride 8)."""

    def __init__(self, outputs: int = 6) -> None:
        super().__init__()
        self.quant = QuantStub(scale=1 / 128)
        self.stem = nn.Sequential(ConvBnSiLU(3, 8, 3, 2), ConvBnSiLU(8, 16, 3, 2))
        self.stage3 = nn.Sequential(ConvBnSiLU(16, 16, 3, 2), C2f(16, 16, shortcut=True))
        self.stage4 = nn.Sequential(ConvBnSiLU(16, 32, 3, 2), C2f(32, 32, shortcut=True), SPPF(32, 32))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(48, 16)
        self.head = nn.Conv2d(16, outputs, 1)
        self.scores = nn.Sigmoid()
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.stage3(self.stem(self.quant(x)))
        p4 = self.stage4(p3)
        y = self.neck(torch.cat([self.upsample(p4), p3], 1))
        return self.dequant(self.scores(self.head(y)))


def _build_torchvision(name: str, settings: dict[str, object]) -> nn.Module:
    """A classifier from ``torchvision.models``, or a segmentation model without pretrained weights (backbone
    included: nothing is downloaded) nor auxiliary head, giving its ``out`` map."""
    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        segmentation = getattr(torchvision.models.segmentation, name)
        return SegmentationMap(segmentation(num_classes=10, weights=None, weights_backbone=None, aux_loss=False, **settings))
    model = getattr(torchvision.models, name)(num_classes=10, **settings)
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():  # the ViT's head starts at zero: outputs would be 0
            nn.init.normal_(module.weight, std=0.2)
    return model


def torchvision_model(name: str, **settings: object) -> nn.Module:
    """Random-init torchvision classifier or segmentation model, wrapped, with BatchNorm statistics set on random
    data (:func:`with_batchnorm_statistics`). ``settings`` go to the constructor (``block_config`` of a
    ``DenseNet``...)."""
    torch.manual_seed(0)
    return with_batchnorm_statistics(Wrapped(_build_torchvision(name, settings)))


def with_batchnorm_statistics(model: nn.Module, shape: Sequence[int] = (4, 3, 64, 64)) -> nn.Module:
    """``model`` in eval mode, after a few forward passes in train mode on random batches of ``shape``.

    Fresh BatchNorm layers (mean 0, var 1) let random-init activations shrink towards zero over the layers;
    the passes give every layer unit-scale activations, like a trained model's.
    """
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape))
    return model.eval()


def calibrate(
    model: nn.Module,
    example: torch.Tensor,
    target: str,
    batches: Callable[[], torch.Tensor],
    count: int = 3,
    qconfig: object = default_calib_qconfig,
) -> torch.fx.GraphModule:
    """edgeq's calibrate on ``count`` batches drawn from ``batches``."""
    return edgeq_calibrate(model, (batches() for _ in range(count)), example_inputs=(example,), target=target, qconfig=qconfig)


def integer_model(model: nn.Module, example: torch.Tensor, target: str, **kwargs: object) -> IntegerModel:
    """Calibrated on random batches shaped like ``example``, then converted."""
    prepared = calibrate(model, example, target, lambda: torch.randn_like(example), **kwargs)
    return convert_fx(prepared)


# ---- ONNX Runtime's quantization --------------------------------------------------------------------------------


def random_batches(shape: Sequence[int], count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """``count`` float32 arrays of standard normal values, from one generator seeded with ``seed``."""
    generator = np.random.default_rng(seed)
    return [generator.normal(size=tuple(shape)).astype(np.float32) for _ in range(count)]


def float_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``model`` exported by torch.onnx's TorchScript exporter (opset 13), with one input named ``x``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=13, input_names=["x"])
    return path


class _Batches(CalibrationDataReader):
    """Calibration batches for an ONNX model's input ``x``."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self.batches = iter([{"x": batch} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def ort_quantize_static(
    float_path: Path,
    path: Path,
    batches: Sequence[np.ndarray],
    activation: QuantType = QuantType.QUInt8,
    symmetric: bool = False,
    per_channel: bool = False,
    quant_format: QuantFormat = QuantFormat.QDQ,
) -> Path:
    """ONNX Runtime's ``quantize_static`` of a float ONNX file (input ``x``) into a QDQ (or ``quant_format``) file
    with int8 weights, calibrated on ``batches``; by default, as ORT's defaults: uint8 activations with zero
    points, per-tensor weights."""
    quantize_static(str(float_path), str(path), _Batches(batches), quant_format=quant_format,
                    activation_type=activation, weight_type=QuantType.QInt8, per_channel=per_channel,
                    extra_options={"ActivationSymmetric": symmetric})
    return path


def without_identities(path: Path) -> Path:
    """torch.onnx shares googlenet's equal biases through Identity nodes, which quantize_static cannot read as
    initializers: each Identity of an initializer becomes a copy of it."""
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(path))
    return path


def rewrite_artifact(source: Path, target: Path, change: Callable[[dict, dict], None]) -> Path:
    """Copy an artifact, letting ``change(manifest, members)`` edit the manifest dict and the members dict."""
    with zipfile.ZipFile(source) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        members = {i.filename: archive.read(i) for i in archive.infolist() if i.filename != "manifest.json"}
    change(manifest, members)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            archive.writestr(name, data)
    return target


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only for this process: immutable (``chattr +i``) when running as root, whom permissions do
    not stop; else without write permission."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no folder is read-only to root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
