"""Per-layer sensitivity: one layer int8 at a time, ranked, as a table and a chart."""

import json
import xml.etree.ElementTree as ET

import pytest

from compress_models import WORKLOADS, digits, hard_to_quantize, onnx_of, one_torch_thread  # noqa: F401  (autouse)
from edgeslim.components.common.stage_configs import PTQQuantizeConfig
from edgeslim.components.quantize.sensitivity import (
    format_table, layer_sensitivity, preprocessed, quantizable_layers, rank, write)
from tests.spread import measured

CFG = PTQQuantizeConfig(calibrator="minmax", num_samples=64)
SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("kind", WORKLOADS)
def test_every_layer_measured_and_ranked(kind, tmp_path):
    table = layer_sensitivity(onnx_of(kind), CFG, data=digits())
    layers = quantizable_layers(preprocessed(onnx_of(kind), tmp_path / "pre.onnx"))
    assert sorted(r["node"] for r in table["layers"]) == sorted(r["node"] for r in layers)
    rows = table["layers"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(rows[i]["metric_drop"] >= rows[i + 1]["metric_drop"] for i in range(len(rows) - 1))
    # the least SQNR of any one int8 layer: 29.6-35.1 dB (tests/spread.json)
    assert measured(f"sensitivity.min_layer_sqnr_db[{kind}]", min(r["sqnr_db"] for r in rows)) > 10  # one int8 layer is a small perturbation
    assert table["split"] == "val"
    for r in rows:
        assert abs(table["fp32_metric"] - r["metric"] - r["metric_drop"]) < 1e-3


@pytest.mark.parametrize("kind", WORKLOADS)
def test_hard_to_quantize_layer_ranks_first(kind):
    _, layer = hard_to_quantize(kind)
    table = layer_sensitivity(onnx_of(kind, damaged=True), CFG, data=digits())
    by_node = {r["node"]: r for r in table["layers"]}
    worst = by_node[rank(table, "sqnr")[0]]
    assert worst["layer"] == layer
    others = [r["sqnr_db"] for r in table["layers"] if r["layer"] != layer]
    assert measured(f"sensitivity.damaged_layer_margin_db[{kind}]", min(others) - worst["sqnr_db"]) > 1.0


def test_table_text_and_chart(tmp_path):
    table = layer_sensitivity(onnx_of("cnn"), CFG, data=digits())
    paths = write(table, tmp_path)
    chart = ET.parse(paths["svg"]).getroot()
    assert chart.tag == SVG + "svg"
    bars = [e for e in chart.iter(SVG + "rect") if e.find(SVG + "title") is not None]
    assert len(bars) == 2 * len(table["layers"])  # a drop bar and an SQNR bar per layer
    texts = [t.text for t in chart.iter(SVG + "text")]
    assert "Per-layer int8 sensitivity (minmax calibration)" in texts and table["layers"][0]["layer"][:22] in texts
    assert json.loads(paths["json"].read_text()) == table
    text = paths["txt"].read_text()
    assert text == format_table(table) + "\n"
    first = table["layers"][0]["layer"]
    assert text.splitlines()[2].split()[:2] == ["1", first]
