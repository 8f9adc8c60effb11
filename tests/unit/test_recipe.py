"""Recipes are validated completely, and every error names the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.recipe import load_recipe, recipe_from_dict
from edgeslim.components.common.stage_configs import PTQQuantizeConfig
from edgeslim.pipelines.demo import DEMO_RECIPE


def demo() -> dict:
    return yaml.safe_load(DEMO_RECIPE.read_text())


def ptq() -> dict:
    """The demo recipe with a plain export + PTQ stage list."""
    d = demo()
    d["stages"] = [{"export": {"opset": 18}}, {"quantize": {"method": "ptq", "calibrator": "percentile"}}]
    return d


def test_demo_recipe_loads_and_round_trips():
    r = load_recipe(DEMO_RECIPE)
    assert r.source == "models:/digits-teacher@champion"
    assert [s.stage for s in r.stages] == ["distill", "prune", "export", "quantize"]
    assert r.quantize.method == "auto" and r.engines.device_classes == ["orin-sm87-jp6.1-trt10.3"]
    again = recipe_from_dict(r.to_dict())
    assert again.digest() == r.digest()


def test_digest_ignores_tracking_uri_but_not_settings():
    r = load_recipe(DEMO_RECIPE)
    assert r.with_overrides(tracking_uri="http://elsewhere").digest() == r.digest()
    d = demo()
    d["stages"][-1]["quantize"]["num_samples"] = 256
    assert recipe_from_dict(d).digest() != r.digest()


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.update(sorce="x"), "sorce: unknown key; did you mean 'source'"),
    (lambda d: d["gate"].update(max_metric_dorp=1), "gate.max_metric_dorp: unknown key; did you mean 'max_metric_drop'"),
    (lambda d: d["gate"].update(max_metric_drop="one"), "gate.max_metric_drop: got 'one'; expected a number"),
    (lambda d: d["gate"].update(min_top1_agreement=1.5), "gate.min_top1_agreement: got 1.5"),
    (lambda d: d["stages"][-1]["quantize"].update(calibrator="entropi"),
     "stages[1].quantize.calibrator: unknown calibrator 'entropi'; did you mean 'entropy'?"),
    (lambda d: d["stages"][-1]["quantize"].update(num_samples=0), "num_samples: got 0"),
    (lambda d: d["stages"][-1]["quantize"].update(percentile=20), "percentile: got 20"),
    (lambda d: d["stages"][-1]["quantize"].update(method="magic"), "quantize.method: unknown method 'magic'"),
    (lambda d: d["stages"][-1]["quantize"].update(method="ptw"),
     "stages[1].quantize.method: unknown method 'ptw'; did you mean 'ptq'?"),
    (lambda d: d["stages"].__setitem__(-1, {"quantize": {"method": "auto", "calibrators": ["mse", "minmx"]}}),
     "stages[1].quantize.calibrators[1]: unknown calibrator 'minmx'; did you mean 'minmax'?"),
    (lambda d: d["stages"].append({"export": {}}), "the last stage must be the one 'quantize' stage"),
    (lambda d: d["stages"].append({"compresss": {}}), "compresss: unknown key"),
    (lambda d: d.update(source="digits-teacher"), "source: got 'digits-teacher'; use a registry URI"),
    (lambda d: d["stages"][0].update(export={"opset": 9}), "export.opset: got 9"),
    (lambda d: d["evaluate"].update(latency_batches=[0]), "evaluate.latency_batches"),
    (lambda d: d["register"].update(alias="edge candidate"), "register.alias"),
])
def test_bad_recipes_name_the_key_and_the_fix(mutate, needle):
    d = ptq()
    mutate(d)
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict(d)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_and_unparsable_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file; write one with 'edgeslim init"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(bad)


def test_config_json_round_trip_carries_type_and_version():
    c = PTQQuantizeConfig(calibrator="entropy", num_samples=64)
    j = c.to_json_dict()
    assert j["type"] == "PTQQuantizeConfig" and j["version"] == 1
    assert PTQQuantizeConfig.from_dict(j) == c


@pytest.mark.parametrize("version,needle", [
    (2, "quantize.version: got 2; this edgeslim reads config versions up to 1: upgrade edgeslim"),
    ("1", "quantize.version: got '1'; a config version is a whole number"),
    (0, "quantize.version: got 0; a config version is a whole number"),
])
def test_a_config_from_a_newer_or_unknown_version_is_one_line_not_misread(version, needle):
    j = {**PTQQuantizeConfig(calibrator="entropy").to_json_dict(), "version": version}
    with pytest.raises(ConfigError) as err:
        PTQQuantizeConfig.from_dict(j, "quantize")
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_resources_and_cluster_round_trip_and_leave_the_digest_alone():
    base = load_recipe(DEMO_RECIPE)
    d = demo()
    d["resources"] = {"train": {"gpu": 1, "cpu": 4, "memory": "16Gi"}, "light": {"cpu": "250m"}, "retries": 2}
    d["cluster"] = {"mlflow_secret": "team-mlflow", "s3_secret": ""}
    r = recipe_from_dict(d)
    assert r.resources.requests("train") == ("4", "16Gi") and r.resources.train.gpu == 1
    assert r.resources.requests("light") == ("250m", "2Gi")  # memory: the kind's default
    assert r.resources.requests("compute") == ("2", "8Gi")
    assert recipe_from_dict(r.to_dict()) == r
    # Where tasks run does not change what they make: same digest, same registered version.
    assert r.digest() == base.digest()
    assert "resources" not in base.to_dict() and "cluster" not in base.to_dict()


@pytest.mark.parametrize("section, body, needle", [
    ("resources", {"train": {"cpu": "4 cores"}}, "resources.train.cpu: got '4 cores'; use cores (4, 0.5) or millicores"),
    ("resources", {"train": {"memory": "1.5Gi"}}, "resources.train.memory: got '1.5Gi'; use a whole number"),
    ("resources", {"train": {"gpu": -1}}, "resources.train.gpu: got -1; use 0 or more"),
    ("resources", {"train": {"gpus": 1}}, "resources.train.gpus: unknown key; did you mean 'gpu'"),
    ("resources", {"light": {"gpu": 1}}, "resources.light.gpu: only training tasks ask for GPUs"),
    ("resources", {"engine": {"gpu": 1}}, "use engines.accelerator_limit"),
    ("resources", {"retries": 50}, "resources.retries: got 50; use 0 (no retries) to 10"),
    ("resources", {"train": {"node_selector": {"pool": 8}}}, "resources.train.node_selector: got {'pool': 8}"),
    ("resources", {"trian": {}}, "resources.trian: unknown key; did you mean 'train'"),
    ("cluster", {"mlflow_secret": "Team_MLflow"}, "cluster.mlflow_secret: got 'Team_MLflow'; use a Kubernetes Secret"),
    ("cluster", {"s3_secrets": "x"}, "cluster.s3_secrets: unknown key; did you mean 's3_secret'"),
    ("cluster", {"image_pull_secrets": ["Reg_Cred"]}, "cluster.image_pull_secrets: got 'Reg_Cred'; use Kubernetes "
     "Secret names"),
])
def test_bad_resources_and_cluster_settings_name_the_key_and_the_fix(section, body, needle):
    d = ptq()
    d[section] = body
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict(d)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)
