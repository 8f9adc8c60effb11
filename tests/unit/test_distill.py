"""Knowledge distillation: logit and feature KD, student sources, repeatability, bad input."""

import pytest
import torch

from compress_models import WORKLOADS, digits, same_state, state, trained, one_torch_thread  # noqa: F401  (autouse)
from edgeslim.components.common.errors import ConfigError, DataError
from edgeslim.components.reference.digits import DigitsCNN
from edgeslim.components.common.stage_configs import FeatureDistillConfig, LogitDistillConfig
from edgeslim.components.transform.distill import distill
from edgeslim.components.transform.train import TrainConfig, fit, kd_loss
from edgeslim.components.transform.prune import count_macs_params
from tests.spread import measured

X1 = torch.zeros(1, 1, 8, 8)
# Two epochs of distillation into a half-width student, measured (tests/spread.json: 3 kernel sets x 3 seeds):
#   validation gain over the student as built: cnn 42.8-63.9 pt, mobile 35.6-57.8 pt -> bound 20 (>= 15 pt margin)
#   test top-1 afterwards: cnn 57.4-79.9 %, mobile 55.2-67.1 % -> bound 40 (>= 15 pt margin)
#   feature KD, test top-1: cnn 48.7-73.5 %, mobile 50.1-67.1 % -> bound 35 (>= 13 pt margin)
# (A point bound near the teacher, as before, failed on an AVX2 machine: 55.7 against 92.8 - 30.
# Two epochs make a student that learns, not one that matches its teacher.)
WIDTH_GAIN_PT = {"cnn": 20.0, "mobile": 20.0}
WIDTH_TOP1 = {"cnn": 40.0, "mobile": 40.0}
FEATURE_TOP1 = {"cnn": 35.0, "mobile": 35.0}


def test_kd_loss_blends_kl_and_hard_labels():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), ce)
    assert torch.allclose(kd_loss(t, t, y, 4.0, 0.6), 0.4 * torch.nn.functional.cross_entropy(t, y), atol=1e-6)
    # T^2 scaling: the soft term at T=2 is 4x the KL of the T-softened distributions
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1), reduction="batchmean")
    assert torch.allclose(kd_loss(s, t, y, 2.0, 1.0), 4 * kl, atol=1e-5)


@pytest.mark.parametrize("kind", WORKLOADS)
def test_width_student_is_smaller_and_learns(kind):
    teacher = trained(kind)
    before = state(teacher)
    d = digits()
    res = distill(teacher, LogitDistillConfig(student="width", width=0.5, epochs=2), data=d, teacher=teacher)
    m = res.metrics
    assert m["student_params"] < 0.5 * m["teacher_params"]
    assert count_macs_params(res.model, X1) == (m["student_macs"], m["student_params"])
    learned = measured(f"distill.width_student_gain_pt[{kind}]", m["student_top1_val"] - m["student_top1_val_before"])
    assert learned > WIDTH_GAIN_PT[kind]
    assert measured(f"distill.width_student_top1_test[{kind}]", m["student_top1_test"]) > WIDTH_TOP1[kind]
    assert same_state(before, state(teacher)), "distill changed the teacher"
    assert res.lineage["student"] == "teacher@width0.5"


def test_previous_stage_student_improves_under_distillation():
    d = digits()
    teacher = trained("cnn")
    torch.manual_seed(0)
    weak = DigitsCNN(width=4)  # untrained: the previous stage's output
    res = distill(weak, LogitDistillConfig(student="previous", epochs=3, optimizer="sgd", lr=0.05,
                                           schedule="cosine"), data=d, teacher=teacher)
    # untrained: 10.0 % in every run (chance); gain after 3 epochs 37.8-51.7 pt (tests/spread.json)
    assert measured("distill.untrained_top1_val", res.metrics["student_top1_val_before"]) < 30.0
    gain = measured("distill.previous_student_gain_pt", res.metrics["student_top1_val"] - res.metrics["student_top1_val_before"])
    assert gain > 25.0
    assert res.lineage["student"] == "previous stage"
    assert next(weak.parameters()).abs().sum() > 0 and res.model is not weak


def test_same_seed_same_student():
    d, t = digits(), trained("cnn")
    cfg = LogitDistillConfig(student="width", width=0.5, epochs=1, seed=3)
    a = distill(t, cfg, data=d, teacher=t).model
    b = distill(t, cfg, data=d, teacher=t).model
    assert same_state(state(a), state(b))
    c = distill(t, LogitDistillConfig(student="width", width=0.5, epochs=1, seed=4), data=d, teacher=t).model
    assert not same_state(state(a), state(c))


@pytest.mark.parametrize("kind,pairs", [
    ("cnn", [["features.10", "features.10"], ["classifier.1", "classifier.1"]]),
    ("mobile", [["blocks.2", "blocks.2"], ["head", "head"]]),
])
def test_feature_kd_with_adapters_for_narrower_student(kind, pairs):
    d, t = digits(), trained(kind)
    cfg = FeatureDistillConfig(student="width", width=0.5, epochs=2, layer_pairs=pairs, feature_weight=0.5)
    res = distill(t, cfg, data=d, teacher=t)
    assert measured(f"distill.feature_kd_top1_test[{kind}]", res.metrics["student_top1_test"]) > FEATURE_TOP1[kind]
    # the adapters were training-only: the student has no extra modules and no hooks left
    names = {n for n, _ in res.model.named_modules()}
    assert not any("adapter" in n for n in names)
    assert all(not m._forward_hooks for m in res.model.modules())
    assert all(not m._forward_hooks for m in t.modules())


def test_feature_kd_changes_training():
    d, t = digits(), trained("cnn")
    logit = distill(t, LogitDistillConfig(student="width", width=0.5, epochs=1), data=d, teacher=t).model
    feat = distill(t, FeatureDistillConfig(student="width", width=0.5, epochs=1,
                                           layer_pairs=[["features.10", "features.10"]]),
                   data=d, teacher=t).model
    assert not same_state(state(logit), state(feat))


def test_missing_feature_layer_lists_close_matches():
    d, t = digits(), trained("cnn")
    cfg = FeatureDistillConfig(student="width", width=0.5, epochs=1, layer_pairs=[["featurs.10", "features.10"]])
    with pytest.raises(ConfigError) as e:
        distill(t, cfg, data=d, teacher=t)
    msg = str(e.value)
    assert "teacher has no layer 'featurs.10'" in msg and "features.10" in msg and "\n" not in msg


def test_student_with_other_output_shape_is_refused():
    d, t = digits(), trained("cnn")
    with pytest.raises(ConfigError, match=r"outputs shape \(2, 5\) but the teacher outputs \(2, 10\)"):
        distill(DigitsCNN(width=4, num_classes=5), LogitDistillConfig(student="previous", epochs=1),
                data=d, teacher=t)


def test_config_refusals():
    with pytest.raises(ConfigError, match="student_uri"):
        LogitDistillConfig(student="uri", student_uri="runs:/abc/model")
    with pytest.raises(ConfigError, match="width"):
        LogitDistillConfig(student="width", width=1.5)
    with pytest.raises(ConfigError, match="alpha"):
        LogitDistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="layer_pairs"):
        FeatureDistillConfig(layer_pairs=[["only-one"]])
    with pytest.raises(ConfigError, match="did you mean 'onecycle'"):
        LogitDistillConfig.from_dict({"schedule": "onecylce"})


def test_fit_needs_samples():
    d = digits()
    with pytest.raises(DataError, match="empty"):
        fit(DigitsCNN(4), TrainConfig(epochs=1, lr=1e-3), x=d.x_train[:0], y=d.y_train[:0])
