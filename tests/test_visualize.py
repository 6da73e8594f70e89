"""visualize_model / edgeq visualize: the compiled graph's SVG (every op, region, colour and transition) and the
errors for what is not a readable artifact."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ElementTree

import pytest

from edgeq.cli import main
from edgeq.compile.compiled_graph import CompiledGraphError
from edgeq.errors import EdgeqError, TargetError
from edgeq.visualize import PLACEMENT_COLOURS, TRANSITION_COLOUR, graph_svg, visualize_model

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def fallback(functional_ops_npu_s):
    return functional_ops_npu_s[3]


def groups(svg: str) -> dict[str, ElementTree.Element]:
    """The SVG's ``<g>`` elements by id."""
    return {g.get("id"): g for g in ElementTree.fromstring(svg).iter(f"{SVG}g") if g.get("id")}


def fills(element: ElementTree.Element) -> set[str]:
    return {shape.get("fill") for shape in element.iter() if shape.get("fill")}


def test_every_op_region_and_boundary_is_drawn_in_its_placement_colour(fallback):
    graph = fallback.graph
    drawn = groups(graph_svg(graph))
    for op in graph.ops:
        assert PLACEMENT_COLOURS[op.placement].fill in fills(drawn[f"op:{op.name}"]), op.name
    assert {op.placement for op in graph.ops} == {"NPU", "CPU"}
    for region in graph.regions:
        border = {shape.get("stroke") for shape in drawn[f"region:{region.name}"].iter() if shape.get("stroke")}
        assert PLACEMENT_COLOURS[region.placement].border in border
    assert {f"input:{name}" for name in graph.inputs} | {f"output:{name}" for name in graph.outputs} <= set(drawn)


def test_transitions_are_the_edges_between_placements(fallback):
    graph = fallback.graph
    placement = {op.name: op.placement for op in graph.ops}
    expected = sum(
        placement[tensor.producer] != placement[consumer]
        for tensor in graph.tensors.values()
        if tensor.producer in placement
        for consumer in tensor.consumers
    )
    drawn = [g for name, g in groups(graph_svg(graph)).items() if name.startswith("transition:")]
    assert expected == fallback.report.summary.transitions > 0
    assert len(drawn) == expected
    for edge in drawn:
        assert TRANSITION_COLOUR in {shape.get("stroke") for shape in edge.iter() if shape.get("stroke")}


def test_edges_carry_tensor_shape_and_size(fallback):
    svg = graph_svg(fallback.graph)
    texts = [t.text for t in ElementTree.fromstring(svg).iter(f"{SVG}text")]
    assert "1x8x8x8 · 512 B" in texts  # conv_a's int8 output: 8 channels of 8x8
    assert "conv2d 3x3/2 g8" in " ".join(t or "" for t in texts)  # the grouped, strided conv's kind line


def test_float_ops_have_their_own_colour(fallback):
    graph = fallback.graph
    floated = dataclasses.replace(graph, ops=[dataclasses.replace(op, placement="CPU (float)") if op.op == "transpose" else op for op in graph.ops])
    (transpose,) = [op for op in graph.ops if op.op == "transpose"]
    drawn = groups(graph_svg(floated))
    assert PLACEMENT_COLOURS["CPU (float)"].fill in fills(drawn[f"op:{transpose.name}"])
    assert PLACEMENT_COLOURS["CPU (float)"].fill in fills(drawn["graph0"])  # in the legend too


def test_visualize_model_and_command_line(fallback, tmp_path, capsys):
    svg_path = visualize_model(fallback.artifact, save_path=tmp_path / "a.svg")
    assert svg_path.read_text().startswith("<?xml")
    output = tmp_path / f"[b] {'long name ' * 10}.svg"  # brackets are no markup; a path wider than the terminal is not wrapped
    assert main(["visualize", str(fallback.artifact), "-o", str(output)]) == 0
    assert f"wrote {output}\n" in capsys.readouterr().out
    assert output.read_text() == svg_path.read_text()


def test_a_model_is_compiled_first_for_the_target_given(functional_ops_npu_s, tmp_path):
    _, int_model, samples, _ = functional_ops_npu_s
    svg = visualize_model(int_model, (samples[:1],), save_path=tmp_path / "cpu.svg", target="x86_64").read_text()
    drawn = groups(svg)
    boxes = [g for name, g in drawn.items() if name.startswith("op:")]
    assert boxes and all(PLACEMENT_COLOURS["CPU"].fill in fills(box) for box in boxes)
    assert "x86_64 (cpu, x86_64 library)" in svg and not any(name.startswith("transition:") for name in drawn)


def test_bad_input_is_named(fallback, tmp_path, capsys):
    (tmp_path / "notes.edgeq").write_text("not a zip file")
    with pytest.raises(CompiledGraphError, match="notes.edgeq: not an edgeq artifact, or truncated"):
        visualize_model(tmp_path / "notes.edgeq", save_path=tmp_path / "x.svg")
    data = fallback.artifact.read_bytes()
    (tmp_path / "damaged.edgeq").write_bytes(data[: len(data) // 2])
    assert main(["visualize", str(tmp_path / "damaged.edgeq"), "-o", str(tmp_path / "y.svg")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"edgeq visualize: error: {tmp_path / 'damaged.edgeq'}: ") and "Traceback" not in error
    with pytest.raises(TargetError, match="unknown target 'npu-x'; known targets"):
        visualize_model(fallback.artifact, save_path=tmp_path / "z.svg", target="npu-x")
    with pytest.raises(TargetError, match="f.edgeq: compiled for npu-s, not npu-m"):
        visualize_model(fallback.artifact, save_path=tmp_path / "z.svg", target="npu-m")
    assert not list(tmp_path.glob("*.svg"))


def test_missing_graphviz_is_explained(fallback, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(EdgeqError, match="Graphviz's dot program is not installed"):
        graph_svg(fallback.graph)
