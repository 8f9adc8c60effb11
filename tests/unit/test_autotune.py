"""Accuracy-aware quantization: PTQ per calibrator -> float fallback -> QAT, first pass wins."""

import dataclasses
import json

import numpy as np
import pytest

from compress_models import WORKLOADS, digits, hard_to_quantize, onnx_of, trained, one_torch_thread  # noqa: F401  (autouse)
from edgeslim.components.tasks.classification.search import quantize_auto
from edgeslim.components.common.errors import ConfigError, GateRejected
from edgeslim.components.recipe import AccuracyGateConfig
from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig
from edgeslim.components.quantize.ptq import check_qdq
from tests.spread import measured

# SQNR that keeping the damaged layer in float buys over the PTQ trial it starts from (the best
# one by the search's ranking), on the validation split the search judges on: 1.3-3.6 dB over
# 3 kernel sets x 3 seeds (1.6-3.6 dB with minmax alone). Bound 0.5 dB: the fallback must help,
# by a margin the spread does not cross. (+3.0 dB, an older bound, was one machine's figure: an
# AVX2 machine measured +1.2 dB with the earlier damaged layer. Judged on the test split, the
# search's old habit, the gain over the best PTQ SQNR was 1.7-3.5 dB.)
GAIN_DB = 0.5

IMPOSSIBLE = AccuracyGateConfig(max_metric_drop=0.0, min_top1_agreement=1.0, min_sqnr_db=200.0)
# A gate both nets' first PTQ trial clears by several of the 180 validation images. Which images an int8
# model gets right is redrawn by any change of its ranges: percentile ranges moved by under a twentieth of a
# histogram bin (0.04 % at most) take the mobile net's validation top-1 drop from 0.0 to 1.1 pt (2 images),
# past the default gate's 1.0 pt, and its top-1 agreement (0.978) is 1.4 images above the default 0.97. This
# test is about the search stopping at the first trial that passes, not about those margins.
FIRST_PASSES = AccuracyGateConfig(max_metric_drop=3.0, min_top1_agreement=0.94, min_sqnr_db=15.0)


def _auto(model, fp32, cfg, gate, out, data=None):
    return quantize_auto(model, fp32, cfg, data=data or digits(), parent_onnx_path=fp32, gate=gate, out_dir=out)


@pytest.mark.parametrize("kind", WORKLOADS)
def test_first_passing_ptq_wins_and_stops(kind, tmp_path):
    cfg = AccuracyAwareQuantizeConfig(calibrators=["percentile", "minmax"], num_samples=128)
    res = _auto(trained(kind), onnx_of(kind), cfg, FIRST_PASSES, tmp_path)
    trials = res.metrics["trials"]
    assert len(trials) == 1 and trials[0]["kind"] == "ptq" and trials[0]["passed"]
    assert res.metrics["winner"]["trial"] == 1
    assert "percentile" in res.metrics["reason"] and "passed" in res.metrics["reason"]
    report = json.loads((tmp_path / "autotune.json").read_text())
    assert report["winner"] == 1 and len(report["trials"]) == 1
    assert check_qdq(res.model)["zero_points_all_zero"]
    assert res.model.read_bytes() == (tmp_path / "ptq-percentile" / "model.int8.onnx").read_bytes()


def test_every_step_tried_then_refused_with_the_best_trial(tmp_path):
    model, layer = hard_to_quantize("cnn")
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax", "mse"], num_samples=128, max_float_layers=2,
                                      sensitivity_metric="sqnr", qat_epochs=1, placement="all")
    with pytest.raises(GateRejected) as e:
        _auto(model, onnx_of("cnn", damaged=True), cfg, IMPOSSIBLE, tmp_path)
    msg = str(e.value)
    assert "no candidate passed the gate after 5 trial(s)" in msg and "\n" not in msg
    assert "max_float_layers" in msg
    report = json.loads((tmp_path / "autotune.json").read_text())
    rows = report["trials"]
    assert [r["kind"] for r in rows] == ["ptq", "ptq", "fallback", "fallback", "qat"]
    assert report["winner"] is None
    # fallback keeps the most sensitive layer first, then one more
    sens = {r["node"]: r["layer"] for r in report["sensitivity"]["layers"]}
    assert [sens[n] for n in rows[2]["float_layers"]] == [layer]
    assert len(rows[3]["float_layers"]) == 2 and rows[3]["float_layers"][0] == rows[2]["float_layers"][0]
    assert (tmp_path / "sensitivity" / "sensitivity.svg").is_file()
    # keeping the hard layer in float buys fidelity; QAT reports its fake-quant accuracy too
    # (how closely that matches the export is held by test_qat, on models that are not damaged)
    start = next(r for r in rows[:2] if r["calibrator"] == rows[2]["calibrator"])
    assert start == max(rows[:2], key=lambda r: (r["metric"], r["sqnr_db"]))
    assert measured("autotune.fallback_sqnr_gain_db", rows[2]["sqnr_db"] - start["sqnr_db"]) > GAIN_DB
    # and it beats the other calibrator's PTQ too: 0.67-3.6 dB. On val the search may start from
    # the calibrator with the better top-1 but the lower SQNR (seed 0: one val sample apart), so
    # this margin is the smaller one.
    assert measured("autotune.fallback_sqnr_over_every_ptq_db",
                    rows[2]["sqnr_db"] - max(rows[0]["sqnr_db"], rows[1]["sqnr_db"])) > 0.0
    assert 0.0 <= rows[4]["fake_quant_top1_test"] <= 100.0
    # QAT starts from the best candidate so far: highest metric, then SQNR
    best = max(rows[:4], key=lambda r: (r["metric"], r["sqnr_db"]))
    assert rows[4]["float_layers"] == best["float_layers"] and rows[4]["calibrator"] == best["calibrator"]


def _judged(rows):
    """The rows without what differs between two runs of one search (paths, timings)."""
    return [{k: v for k, v in r.items() if k not in ("model", "seconds", "judge_seconds", "mlflow_run_id")} for r in rows]


def test_the_search_chooses_on_validation_and_never_reads_the_test_split(tmp_path):
    model, _ = hard_to_quantize("cnn")
    fp32 = onnx_of("cnn", damaged=True)
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax", "mse"], num_samples=128, max_float_layers=2,
                                      sensitivity_metric="sqnr", qat=False, placement="all")
    with pytest.raises(GateRejected):
        _auto(model, fp32, cfg, IMPOSSIBLE, tmp_path / "probe")
    probe = json.loads((tmp_path / "probe" / "autotune.json").read_text())
    assert probe["chosen_on"] == "val"
    sqnr = [r["sqnr_db"] for r in probe["trials"]]
    # a gate only the last fallback passes (the second layer in float adds 1.6-2.2 dB over every
    # earlier trial), so the search chooses a calibrator, ranks layers, and picks a winner
    gate = AccuracyGateConfig(max_metric_drop=100.0, min_top1_agreement=0.0, min_sqnr_db=(max(sqnr[:3]) + sqnr[3]) / 2)
    clean = digits()
    rng = np.random.default_rng(0)
    poisoned = dataclasses.replace(clean, x_test=rng.random(clean.x_test.shape, dtype=np.float32),
                                   y_test=rng.permutation(clean.y_test))
    assert (poisoned.y_test != clean.y_test).mean() > 0.5
    runs = {name: _auto(model, fp32, cfg, gate, tmp_path / name, data=data)
            for name, data in (("clean", clean), ("poisoned", poisoned))}
    a, b = runs["clean"].metrics, runs["poisoned"].metrics
    assert a["winner"]["trial"] == b["winner"]["trial"] == 4 and a["winner"]["kind"] == "fallback"
    assert _judged(a["trials"]) == _judged(b["trials"]) and a["reason"] == b["reason"]
    assert a["sensitivity"] == b["sensitivity"] and a["sensitivity"]["split"] == "val"
    assert runs["clean"].model.read_bytes() == runs["poisoned"].model.read_bytes()


def test_float_fallback_wins_when_it_is_the_first_to_pass(tmp_path):
    model, layer = hard_to_quantize("cnn")
    fp32 = onnx_of("cnn", damaged=True)
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=128, max_float_layers=2,
                                      sensitivity_metric="sqnr", qat=False, placement="all")
    with pytest.raises(GateRejected):
        _auto(model, fp32, cfg, IMPOSSIBLE, tmp_path / "probe")
    # the probe's rows are validation figures, the split the gate below is judged on
    probe = json.loads((tmp_path / "probe" / "autotune.json").read_text())["trials"]
    ptq, fb1 = probe[0]["sqnr_db"], probe[1]["sqnr_db"]
    assert measured("autotune.fallback_sqnr_gain_minmax_db", fb1 - ptq) > GAIN_DB
    gate = AccuracyGateConfig(max_metric_drop=100.0, min_top1_agreement=0.0, min_sqnr_db=(ptq + fb1) / 2)
    res = _auto(model, fp32, cfg, gate, tmp_path / "run")
    assert [t["kind"] for t in res.metrics["trials"]] == ["ptq", "fallback"]
    assert res.metrics["winner"]["trial"] == 2
    assert layer in res.metrics["reason"] and "float" in res.metrics["reason"]


def test_placement_auto_tries_tensorrts_placement_on_the_same_ranges_when_all_fails(tmp_path):
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import quantize

    model, _ = hard_to_quantize("cnn")
    fp32 = onnx_of("cnn", damaged=True)
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=128, max_float_layers=1,
                                      sensitivity_metric="sqnr", qat=False)
    assert cfg.placement == "auto"  # the default
    with pytest.raises(GateRejected) as e:
        _auto(model, fp32, cfg, IMPOSSIBLE, tmp_path / "probe")
    assert "after 3 trial(s)" in str(e.value)
    rows = json.loads((tmp_path / "probe" / "autotune.json").read_text())["trials"]
    # PTQ with Q/DQ on every op, then on the weighted layers' inputs only; the fallback keeps the better one's
    assert [(r["kind"], r["placement"]) for r in rows[:2]] == [("ptq", "all"), ("ptq", "weighted")]
    best = max(rows[:2], key=lambda r: (r["metric"], r["sqnr_db"]))
    assert rows[2]["kind"] == "fallback" and rows[2]["placement"] == best["placement"]
    # the second placement reuses the first one's ranges: the same model as a PTQ that calibrates itself
    direct = quantize(fp32, PTQQuantizeConfig(calibrator="minmax", num_samples=128, placement="weighted"),
                      data=digits(), out_dir=tmp_path / "direct")
    assert (tmp_path / "probe" / "ptq-minmax-weighted" / "model.int8.onnx").read_bytes() == direct.model.read_bytes()
    assert check_qdq(direct.model)["zero_points_all_zero"]
    # a gate between the two placements' SQNR on val: the weighted trial is the first to pass
    lo, hi = sorted(r["sqnr_db"] for r in rows[:2])
    # weighted keeps the pointwise ops' outputs float: +0.41..+0.59 dB over all-int8 on val (native, avx2, default kernels)
    assert measured("autotune.weighted_over_all_sqnr_db", rows[1]["sqnr_db"] - rows[0]["sqnr_db"]) > 0.0
    gate = AccuracyGateConfig(max_metric_drop=100.0, min_top1_agreement=0.0, min_sqnr_db=(lo + hi) / 2)
    res = _auto(model, fp32, cfg, gate, tmp_path / "run")
    assert res.metrics["winner"]["trial"] == 2 and res.metrics["winner"]["placement"] == "weighted"
    assert "weighted layers' inputs only" in res.metrics["reason"]
    assert res.model.read_bytes() == direct.model.read_bytes()


def test_fallback_limit_zero_while_the_gate_fails(tmp_path):
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=64, max_float_layers=0, qat=False,
                                      placement="all")
    with pytest.raises(GateRejected) as e:
        _auto(trained("mobile"), onnx_of("mobile"), cfg, IMPOSSIBLE, tmp_path)
    msg = str(e.value)
    assert "max_float_layers is 0" in msg and "raise it" in msg and "\n" not in msg
    assert e.value.exit_code != 0
    rows = json.loads((tmp_path / "autotune.json").read_text())["trials"]
    assert [r["kind"] for r in rows] == ["ptq"]
    assert not (tmp_path / "sensitivity").exists()


def test_config_refusals():
    with pytest.raises(ConfigError, match="calibrators: empty"):
        AccuracyAwareQuantizeConfig(calibrators=[])
    with pytest.raises(ConfigError, match="repeats"):
        AccuracyAwareQuantizeConfig(calibrators=["mse", "mse"])
    with pytest.raises(ConfigError, match="max_float_layers"):
        AccuracyAwareQuantizeConfig(max_float_layers=-1)
    with pytest.raises(ConfigError, match="did you mean 'entropy'"):
        AccuracyAwareQuantizeConfig.from_dict({"calibrators": ["entropi"]})


def test_pinned_float_layers_hold_in_every_trial_and_the_fallback_adds_others(tmp_path):
    from edgeslim.components.quantize.sensitivity import preprocessed, quantizable_layers

    model, layer = hard_to_quantize("cnn")
    fp32 = onnx_of("cnn", damaged=True)
    node = {r["layer"]: r["node"] for r in quantizable_layers(preprocessed(fp32, tmp_path / "pre.onnx"))}[layer]
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=64, max_float_layers=1, qat=False,
                                      float_layers=[node], placement="all")
    with pytest.raises(GateRejected):
        _auto(model, fp32, cfg, IMPOSSIBLE, tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "autotune.json").read_text())["trials"]
    assert [r["kind"] for r in rows] == ["ptq", "fallback"]
    assert rows[0]["float_layers"] == [node]
    # the pinned layer is not spent as the fallback's one extra layer
    assert rows[1]["float_layers"][0] == node and len(rows[1]["float_layers"]) == 2


def test_a_pinned_pattern_matching_nothing_is_refused_in_one_line(tmp_path):
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=64, float_layers=["no_such_node*"])
    with pytest.raises(ConfigError, match="no_such_node") as e:
        _auto(trained("cnn"), onnx_of("cnn"), cfg, AccuracyGateConfig(), tmp_path)
    assert "\n" not in str(e.value)


class _Client:
    """An MlflowClient that records what the search logs."""

    def __init__(self, tracking_uri=None):
        from types import SimpleNamespace

        self.children, self.batches = {}, []
        self.parent = SimpleNamespace(info=SimpleNamespace(run_id="search", experiment_id="0"))

    def get_run(self, run_id):
        return self.parent

    def create_run(self, experiment_id, run_name, tags):
        from types import SimpleNamespace

        rid = f"child-{len(self.children) + 1}"
        self.children[rid] = {"params": {}, "metrics": {}}
        return SimpleNamespace(info=SimpleNamespace(run_id=rid))

    def log_param(self, rid, k, v):
        self.children[rid]["params"][k] = v

    def log_metric(self, rid, k, v):
        self.children[rid]["metrics"][k] = v

    def set_terminated(self, rid, status):
        pass

    def log_batch(self, rid, metrics=(), params=(), tags=()):
        self.batches.append((rid, {m.key: m.value for m in metrics}, {p.key: p.value for p in params},
                             {t.key: t.value for t in tags}))


def test_the_search_run_carries_the_chosen_trials_figures_beside_its_trials_child_runs(tmp_path, monkeypatch):
    import mlflow

    clients = []
    monkeypatch.setattr(mlflow, "MlflowClient", lambda **kw: clients.append(_Client(**kw)) or clients[-1])
    cfg = AccuracyAwareQuantizeConfig(calibrators=["percentile", "minmax"], num_samples=128)
    res = quantize_auto(trained("cnn"), onnx_of("cnn"), cfg, data=digits(), parent_onnx_path=onnx_of("cnn"),
                        gate=AccuracyGateConfig(), out_dir=tmp_path / "won", tracking_uri="http://mlflow",
                        parent_run_id="search")
    won = res.metrics["winner"]
    (rid, metrics, params, tags), = clients[0].batches
    child = clients[0].children[won["mlflow_run_id"]]
    assert rid == "search" and tags == {"edgeslim.gate_passed": "True"}
    # the search run's figures are the chosen trial's, named as on its child run
    assert {k: metrics[k] for k in child["metrics"]} == child["metrics"]
    # with the top-1 drop's interval on val (at 95%: this gate sets no confidence)
    assert set(child["metrics"]) == {"metric", "metric_drop", "top1_agreement", "sqnr_db", "size_bytes",
                                     "metric_drop_low", "metric_drop_high"}
    assert child["metrics"]["metric_drop_low"] <= won["metric_drop"] <= child["metrics"]["metric_drop_high"]
    assert metrics["trials"] == 1 and metrics["winning_trial"] == 1 and metrics["float_layers"] == 0
    assert params == {"calibrator": "percentile", "kind": "ptq", "placement": won["placement"]}
    assert metrics["size_bytes"] == won["size_bytes"] and metrics["metric"] == won["metric"]

    refuse = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=64, max_float_layers=0, qat=False,
                                         placement="all")
    with pytest.raises(GateRejected):
        quantize_auto(trained("cnn"), onnx_of("cnn"), refuse, data=digits(), parent_onnx_path=onnx_of("cnn"),
                      gate=IMPOSSIBLE, out_dir=tmp_path / "refused", tracking_uri="http://mlflow",
                      parent_run_id="search")
    assert clients[1].batches == [("search", {"trials": 1.0}, {}, {"edgeslim.gate_passed": "False"})]
