"""report.html: its content, per-layer accuracy, edgeq perf, and the page in a real browser (headless Chromium):
rendered, not blank, table and graph present, no network request."""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from models import SmallCNN, integer_model
from PIL import Image

from edgeq.cli import main
from edgeq.errors import QuantizationError
from edgeq.perf import perf_model
from edgeq.report import COSINE_FLOOR, layer_accuracy, render_report, write_report


@pytest.fixture(scope="module")
def fallback(functional_ops_npu_s, tmp_path_factory):
    """The estimate of FunctionalOps on npu-s, its per-layer accuracy, and its report."""
    float_model, int_model, samples, compiled = functional_ops_npu_s
    folder = tmp_path_factory.mktemp("report")
    result = perf_model(compiled.artifact, out_dir=folder)
    accuracy = layer_accuracy(float_model, int_model, (samples,), result.graph)
    return result, accuracy, write_report(result, folder, accuracy)


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of the page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attributes: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attributes.items())]


def layer_rows(html: str, table: str) -> list[str]:
    body = re.search(rf'<table id="{table}".*?<tbody>(.*?)</tbody>', html, re.DOTALL).group(1)
    return re.findall(r"<tr.*?</tr>", body, re.DOTALL)


def test_report_has_summary_table_charts_accuracy_and_graph(fallback):
    result, accuracy, path = fallback
    html = path.read_text()
    assert path.name == "report.html" and (path.parent / "report.json").is_file()
    rows = layer_rows(html, "layer-table")
    assert len(rows) == len(result.layers)
    for row, layer in zip(rows, result.layers):
        assert f'<td class="name">{layer.op.name}</td>' in row and layer.op.placement in row and layer.bound in row
    (split,) = [row for row, layer in zip(rows, result.layers) if layer.op.op == "split"]
    assert "split is not among npu-s&#39;s ops" in split  # the check's reason, escaped
    page = Elements(html)
    assert {f"op:{op.name}" for op in result.graph.ops} <= {a.get("id") for _, a in page.tags}
    assert len(page.find("svg")) == 4  # per layer, per op kind, NPU vs CPU, the graph
    assert "Per op kind" in html and "NPU vs CPU" in html
    assert len(layer_rows(html, "accuracy-table")) == len(accuracy)
    assert html.count('<tr class="flagged">') == 2 * sum(a.flagged for a in accuracy if a.op) + sum(a.flagged for a in accuracy if not a.op)


def test_report_without_accuracy_has_no_accuracy_section(fallback):
    result, _, _ = fallback
    html = render_report(result)
    assert 'id="accuracy"' not in html and "cosine" not in html


def test_report_fetches_nothing(fallback):
    """Self-contained: no attribute or CSS names anything to fetch (the graph's SVG namespaces are not fetches)."""
    _, _, path = fallback
    html = path.read_text()
    page = Elements(html)
    for tag, attributes in page.tags:
        for name in ("src", "href", "xlink:href", "action", "data", "poster"):
            value = attributes.get(name) or ""
            assert not value or value.startswith("#"), (tag, name, value)
        assert not (tag == "link" and attributes.get("rel") == "stylesheet")
    assert not re.search(r"url\(|@import|<!DOCTYPE svg|<\?xml", html, re.IGNORECASE)


def chromium(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium, name lookups all failing (nothing can be fetched), background services off."""
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--host-resolver-rules=MAP * ~NOTFOUND", *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_chromium_renders_the_report_without_network_requests(fallback, tmp_path):
    result, _, path = fallback
    screenshot, netlog = tmp_path / "report.png", tmp_path / "net.json"
    chromium("--window-size=1280,1600", f"--screenshot={screenshot}", f"--log-net-log={netlog}", path.as_uri())
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3)
    background = np.all(pixels >= 245, axis=1).mean()
    assert 0.3 < background < 0.97  # mostly the page's light background, with text, cards and charts on it
    assert len(np.unique(pixels[::7], axis=0)) > 50  # placement colours, text anti-aliasing
    log = json.loads(netlog.read_text())
    kinds = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    requests = [
        event["params"]["url"]
        for event in log["events"]
        if kinds[event["type"]] == "URL_REQUEST_START_JOB"
        and "url" in event["params"]
        and event["params"].get("initiator") != "not an origin"  # Chromium's own services, not the page
    ]
    assert requests == []
    dom = chromium("--dump-dom", path.as_uri()).stdout
    assert len(layer_rows(dom, "layer-table")) == len(result.layers)
    assert dom.count('class="node"') >= len(result.graph.ops) and 'class="cluster"' in dom


def test_clicking_a_column_sorts_the_table(fallback, tmp_path):
    result, _, path = fallback
    click = "<script>[...document.querySelectorAll('#layer-table th')].find(th => th.textContent === 'time').click()</script>"
    (tmp_path / "clicked.html").write_text(path.read_text().replace("</body>", click + "</body>"))
    dom = chromium("--dump-dom", (tmp_path / "clicked.html").as_uri()).stdout
    names = [re.search(r'<td class="name">(.*?)</td>', row).group(1) for row in layer_rows(dom, "layer-table")]
    assert names == [layer.op.name for layer in sorted(result.layers, key=lambda layer: layer.latency_ms)]
    assert 'aria-sort="ascending"' in dom


def test_layer_accuracy_names_ops_and_flags_broken_layers():
    torch.manual_seed(0)
    example = torch.rand(4, 1, 8, 8)
    float_model = SmallCNN().eval()
    int_model = integer_model(float_model, example, "npu-s")
    accuracy = layer_accuracy(float_model, int_model, (example,))
    assert [a.layer for a in accuracy] == ["quant", "conv1", "conv2", "add", "pool", "conv3", "adaptive_avg_pool2d", "fc"]
    assert all(a.cosine > COSINE_FLOOR and not a.flagged and a.sqnr_db > 15 for a in accuracy)
    broken = SmallCNN().eval()
    broken.load_state_dict(float_model.state_dict())
    with torch.no_grad():
        broken.conv3.weight.neg_()  # the float model now disagrees with the integer model from conv3 on
    flagged = [a.layer for a in layer_accuracy(broken, int_model, (example,)) if a.flagged]
    assert flagged[0] == "conv3" and flagged[-1] == "fc"


def test_layer_accuracy_needs_the_matching_float_model():
    torch.manual_seed(0)
    example = torch.rand(2, 1, 8, 8)
    int_model = integer_model(SmallCNN().eval(), example, "npu-s")
    with pytest.raises(QuantizationError, match=r"layer 'fc' of the integer model \(shape \(2, 10\)\) does not match SmallCNN's \(shape \(2, 5\)\)"):
        layer_accuracy(SmallCNN(num_classes=5).eval(), int_model, (example,))


def test_command_line_perf(fallback, tmp_path, capsys):
    result, _, _ = fallback
    artifact = result.source
    assert main(["perf", artifact, "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "estimated latency" in out and "report.html" in out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["summary"]["latency_ms"] == pytest.approx(result.summary.latency_ms)
    assert 'id="layer-table"' in (tmp_path / "out" / "report.html").read_text()
    (tmp_path / "bad.edgeq").write_bytes(b"PK\x03\x04 not really")
    assert main(["perf", str(tmp_path / "bad.edgeq"), "-o", str(tmp_path / "bad")]) == 1
    assert "edgeq perf: error: " in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["perf", artifact, "-o", str(tmp_path / "bad"), "--target", "npu-x"]) == 1
    assert "unknown target 'npu-x'" in capsys.readouterr().err
