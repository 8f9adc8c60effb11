"""The detector autotune's building blocks: head groups and calibration reused across trials (ranges=)."""

from __future__ import annotations

import pytest
import torch

from edgeslim.components.reference.detector import DigitsDetector, make_detection_splits


@pytest.fixture(scope="module")
def onnx_and_data(tmp_path_factory):
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    data = make_detection_splits(seed=0, n_train=16, n_val=4, n_test=4)
    torch.manual_seed(0)
    path = export(DigitsDetector(width=8, head_hidden=8).eval(), OnnxExportConfig(), data=data,
                  out_path=tmp_path_factory.mktemp("det") / "det.onnx").model
    return path, data


def test_ranges_calibrated_once_give_the_same_model_and_do_not_depend_on_float_layers(onnx_and_data, tmp_path):
    import onnx

    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.tasks.detection.search import head_groups
    from edgeslim.components.quantize.ptq import calibrate_onnx, quantize

    path, data = onnx_and_data
    cfg = PTQQuantizeConfig(calibrator="minmax", num_samples=8)
    ranges = calibrate_onnx(path, cfg, data)
    inside = quantize(path, cfg, data=data, out_dir=tmp_path / "a")
    reused = quantize(path, cfg, data=data, out_dir=tmp_path / "b", ranges=ranges)
    assert inside.metrics["ranges"] == reused.metrics["ranges"]
    a, b = onnx.load(str(inside.model)), onnx.load(str(reused.model))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert {i.name: i.raw_data for i in a.graph.initializer} == {i.name: i.raw_data for i in b.graph.initializer}

    heads = head_groups(tmp_path / "a" / "model.pre.onnx")
    floated = quantize(path, PTQQuantizeConfig(calibrator="minmax", num_samples=8, float_layers=heads[1]["nodes"]),
                       data=data, out_dir=tmp_path / "c")
    assert floated.metrics["ranges"] == inside.metrics["ranges"]
    assert set(heads[1]["nodes"]) <= set(floated.metrics["float_layers"])


def test_ranges_of_another_graph_are_refused(onnx_and_data, tmp_path):
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import calibrate_onnx, quantize

    path, data = onnx_and_data
    cfg = PTQQuantizeConfig(calibrator="minmax", num_samples=8)
    ranges = calibrate_onnx(path, cfg, data)
    partial = dict(list(ranges.items())[: len(ranges) // 2])
    with pytest.raises(ValueError, match="must come from calibrate_onnx"):
        quantize(path, cfg, data=data, out_dir=tmp_path / "x", ranges=partial)


def _activation_dq_consumers(path) -> list[set[str]]:
    """Per DequantizeLinear of an activation (not a weight): the op types reading its output
    (an empty set when it only feeds a graph output)."""
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer}
    out = []
    for dq in (n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits):
        out.append({n.op_type for n in g.node if dq.output[0] in n.input})
    return out


def test_weighted_placement_puts_qdq_only_on_the_inputs_of_weighted_ops(onnx_and_data, tmp_path):
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import quantize

    path, data = onnx_and_data
    everywhere = quantize(path, PTQQuantizeConfig(calibrator="minmax", num_samples=8), data=data,
                          out_dir=tmp_path / "all")
    weighted = quantize(path, PTQQuantizeConfig(calibrator="minmax", num_samples=8, placement="weighted"),
                        data=data, out_dir=tmp_path / "w")
    # "all": some quantized tensors feed no weighted op at all (e.g. the sigmoid score outputs)
    assert any("Conv" not in c for c in _activation_dq_consumers(everywhere.model))
    # "weighted": a tensor is quantized only because a Conv reads it (its other readers share the pair)
    assert all("Conv" in c for c in _activation_dq_consumers(weighted.model))
    assert weighted.metrics["placement"] == "weighted" and weighted.metrics["zero_points_all_zero"]
    assert weighted.metrics["qdq_nodes"] < everywhere.metrics["qdq_nodes"]
    # the report says which outputs carry no Q/DQ, so an unused calibrated range is not mistaken for a clip
    assert everywhere.metrics["float_outputs"] == []
    assert weighted.metrics["float_outputs"] == [f"output_{i}" for i in range(6)]


def test_an_unknown_placement_is_one_line():
    from edgeslim.components.common.errors import ConfigError
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig

    with pytest.raises(ConfigError) as e:
        PTQQuantizeConfig.from_dict({"placement": "everywhere"}, prefix="quantize")
    assert "placement" in str(e.value) and "weighted" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("n_val, screened", [(128, False), (256, True)])
def test_trials_are_screened_on_a_quarter_of_val_only_when_it_holds_128_images(n_val, screened, tmp_path):
    import json

    from edgeslim.components.common.errors import GateRejected
    from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, OnnxExportConfig
    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.export import export
    from edgeslim.components.tasks.detection.search import DetectorStrategy
    from edgeslim.components.quantize.search import search
    from edgeslim.components.reference.detector import default_heads

    data = make_detection_splits(seed=0, n_train=16, n_val=n_val, n_test=4)
    torch.manual_seed(0)
    fp32 = export(DigitsDetector(width=8, head_hidden=8).eval(), OnnxExportConfig(), data=data,
                  out_path=tmp_path / "det.onnx").model
    # nothing can pass (a random detector's recall is far below 100): every trial is judged and fails
    impossible = task_from_dict({"kind": "detection", "num_classes": 10, "decoder": {"heads": default_heads()},
                                 "gate": {"min_recall": 100.0}})
    strategy = DetectorStrategy(fp32, impossible)
    lines: list[str] = []
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=8, max_float_layers=1, qat=False)
    with pytest.raises(GateRejected):
        search(fp32, cfg, strategy=strategy, data=data, out_dir=tmp_path / "s", progress=lines.append)
    rows = json.loads((tmp_path / "s" / "autotune.json").read_text())["trials"]
    # placement auto: PTQ with Q/DQ everywhere, then on the weighted layers' inputs; then one fallback
    assert [(r["kind"], r["placement"]) for r in rows][:2] == [("ptq", "all"), ("ptq", "weighted")] and len(rows) == 3
    if not screened:  # too few images to screen on: every trial is judged on all of val
        assert all("screened_on" not in r and "screen" not in r for r in rows)
        return
    # failed on the first quarter (128 images), so not judged on the rest; the line compares like with like
    assert all(r["screened_on"] == 128 for r in rows)
    trial_lines = [ln for ln in lines if "(fail)" in ln]
    assert trial_lines and all("(first 128 val images)" in ln for ln in trial_lines)
    sub = strategy._screen_parent["map50"]
    assert all(f"vs fp32 {sub:.2f}" in ln for ln in trial_lines)


def test_the_first_layer_reading_the_image_stays_float_from_the_first_trial(onnx_and_data, tmp_path):
    """The detector search keeps every input's first weighted layer float (found from the graph, as the output
    tails are): its input is the image, whose levels a symmetric int8 scale halves."""
    import onnx

    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.quantize.sensitivity import input_layers, preprocessed
    from edgeslim.components.reference.detector import default_heads
    from edgeslim.components.tasks.detection.search import DetectorStrategy

    path, _ = onnx_and_data
    pre = preprocessed(path, tmp_path / "pre.onnx")
    g = onnx.load(str(pre)).graph
    first = [n.name for n in g.node if n.op_type == "Conv" and n.input[0] == g.input[0].name]
    assert [h["layers"] for h in input_layers(pre)] == [first]
    task = task_from_dict({"kind": "detection", "num_classes": 10, "decoder": {"heads": default_heads()}})
    groups = DetectorStrategy(path, task).float_from_start(path)
    assert {"label": g.input[0].name, "nodes": first} in groups


def test_select_best_judges_every_ptq_trial_and_returns_the_passing_one_ranked_first(tmp_path):
    import json

    from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, OnnxExportConfig
    from edgeslim.components.common.tasks import task_from_dict
    from edgeslim.components.export import export
    from edgeslim.components.quantize.search import search
    from edgeslim.components.reference.detector import default_heads
    from edgeslim.components.tasks.detection.search import DetectorStrategy

    data = make_detection_splits(seed=0, n_train=16, n_val=8, n_test=4)
    torch.manual_seed(0)
    fp32 = export(DigitsDetector(width=8, head_hidden=8).eval(), OnnxExportConfig(), data=data,
                  out_path=tmp_path / "det.onnx").model
    # a gate every trial passes: which one is returned is select's choice alone
    loose = task_from_dict({"kind": "detection", "num_classes": 10, "decoder": {"heads": default_heads()},
                            "gate": {"max_map_drop": 100.0, "max_map50_95_drop": 100.0, "max_tp_score_drop": 1.0,
                                     "max_recall_drop": 100.0}})
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax", "percentile"], num_samples=8, qat=False, select="best")
    strategy = DetectorStrategy(fp32, loose)
    res = search(fp32, cfg, strategy=strategy, data=data, out_dir=tmp_path / "s")
    rows = json.loads((tmp_path / "s" / "autotune.json").read_text())["trials"]
    assert [(r["calibrator"], r["placement"]) for r in rows] == [
        ("minmax", "all"), ("minmax", "weighted"), ("percentile", "all"), ("percentile", "weighted")]
    best = max(rows, key=strategy.choice_key)
    assert res.metrics["winner"]["trial"] == best["trial"]
    assert "ranked first on val of the 4 PTQ trial(s) that passed" in res.metrics["reason"]
