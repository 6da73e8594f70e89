"""Checks shared by the Ethos-U tests: what an Ethos-U artifact must hold, its outputs against the integer model's,
and the TOSA reference model's against the integer model's."""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edgeq.check.report import Placement
from edgeq.compile import CompileResult
from edgeq.export.tosa import TosaGraph
from edgeq.export.tosa.reference import run_reference
from edgeq.numerics import quantize
from edgeq.quantization.integer_model import IntegerModel
from edgeq.targets import load_target
from edgeq.vela_configs import vela_version
from edgeq_runtime import CommandStreamWarning, Model
from edgeq_runtime.manifest import COMMAND_STREAM_MEMBERS, COMMAND_STREAMS_KEY

DEVICE_LINE = "need the NPU itself; here those regions run as their bit-exact simulation on the CPU"
"""What both runtimes say, once, of an artifact with command streams."""


def assert_vela_compiled_every_npu_region(result: CompileResult, target: str) -> None:
    """Each NPU region has its command stream, encoded weights, TOSA file and Vela's estimate as members named by
    the manifest; the ops check placed on the NPU are the ops inside Vela-compiled regions."""
    streams = result.manifest[COMMAND_STREAMS_KEY]
    npu_regions = [r for r in result.partition.regions if r.placement is Placement.NPU]
    assert [s["region"] for s in streams] == [r.name for r in npu_regions]
    assert [s["ops"] for s in streams] == [r.nodes for r in npu_regions]
    on_npu = [n.record.name for n in result.report.nodes if n.placement is Placement.NPU]
    assert sorted(on_npu) == sorted(op for s in streams for op in s["ops"])
    with zipfile.ZipFile(result.artifact) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["schema_version"] == 3
        for stream in streams:
            for key in COMMAND_STREAM_MEMBERS:
                assert stream[key] in archive.namelist() and stream[key] in manifest["members"], (stream["region"], key)
            commands = archive.read(stream["command_stream"])
            assert commands[:4] == b"COP1" and stream["memory"]["command_stream_bytes"] == len(commands)
            assert stream["memory"]["weight_bytes"] == len(archive.read(stream["weights"])) > 0
            assert archive.read(stream["tosa"])[4:8] == b"TOSA"
            estimate = json.loads(archive.read(stream["estimate"]))
            assert estimate["vela_version"] == stream["compiler_version"] == vela_version()
            assert estimate["options"] == stream["options"]
            assert estimate["summary"]["npu_cycles"] > 0 and {layer["op"] for layer in estimate["layers"]} <= set(stream["ops"]) | {None}
            options = stream["options"]
            assert options[options.index("--accelerator-config") + 1] == target
            assert options[options.index("--system-config") + 1] == load_target(target).vela.system_config


def python_outputs(artifact: Path, x: torch.Tensor) -> list[np.ndarray]:
    """The raw outputs of the Python runtime, which warns once that the command stream needs the device."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Model.load(artifact)
    said = [w for w in caught if issubclass(w.category, CommandStreamWarning)]
    assert len(said) == 1 and DEVICE_LINE in str(said[0].message)
    with model:
        return list(model.run(x.numpy(), raw=True).values())


def expected(int_model, x: torch.Tensor) -> list[np.ndarray]:
    outputs = int_model.run_integer(x)
    return [o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,))]


def assert_equal(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def assert_reference_equals(int_model: IntegerModel, graph: TosaGraph, inputs: Sequence[torch.Tensor]) -> int:
    """Assert that the TOSA reference model's outputs of ``graph`` equal ``run_integer``'s on each input (given to
    the model's one QuantStub, ``quant``); the number of values compared."""
    scale = int_model.graph_module.quant.output_scale
    count = 0
    for x in inputs:
        want = expected(int_model, x)
        assert_equal(run_reference(graph, [quantize(x, scale).numpy()]), want)
        count += sum(w.size for w in want)
    return count
