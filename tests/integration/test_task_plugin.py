"""A third task, added from outside the repository with one entry point and no edit inside edgeslim.

``tests/task_plugin/edgeslim_regression`` is a regression task as its own package (a digit's value as one
float: its config and gate, evaluator, search strategy, report rows and chart, ``edgeslim init`` template
and numpy runtime half). The test installs it as pip would (``tests/entry_points.py``): the package
beside a ``*.dist-info`` whose ``entry_points.txt`` names it in the ``edgeslim.tasks`` group, on a folder
the processes it starts get on their path. Then the real product, against a real `mlflow server`:
``edgeslim run`` with PTQ and with the accuracy-aware search, the registered edge model through
``mlflow.pyfunc``, the controller's golden check and the device's health check, ``edgeslim init --task
regression``.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import register_champion, run_cli, run_process
from tests.entry_points import install_entry_points

pytestmark = pytest.mark.slow

PLUGIN = Path(__file__).resolve().parents[1] / "task_plugin" / "edgeslim_regression"
SOURCE = "models:/digit-regressor@champion"
GATE = {"max_mae_increase": 0.1, "min_sqnr_db": 15.0}
FAST = {"latency_warmup": 1, "latency_repeats": 3, "latency_batches": [1]}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The plugin installed as a distribution is: its package beside ``edgeslim_regression-0.1.dist-info``,
    whose ``entry_points.txt`` names it in ``edgeslim.tasks``; the processes the tests start get it through
    ``$PYTHONPATH``."""
    entry_points = {"edgeslim.tasks": {"regression": "edgeslim_regression:RegressionTask"}}
    with pytest.MonkeyPatch.context() as mp:
        modules = {f"edgeslim_regression/{f.name}": f.read_text() for f in PLUGIN.glob("*.py")}
        yield install_entry_points(tmp_path_factory.mktemp("plugin"), mp, entry_points, modules=modules,
                                   dist="edgeslim-regression")


@pytest.fixture(scope="module")
def env(site) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> Path:
    """scikit-learn's digits, the label a float (the digit's value): 500 train, 150 val, 200 test."""
    from edgeslim.plugins.datasets import SklearnDigits

    d = SklearnDigits(seed=0).load()
    path = tmp_path_factory.mktemp("regression-data") / "digits-values.npz"
    np.savez(path, x_train=d.x_train[:500], y_train=d.y_train[:500].astype(np.float32),
             x_val=d.x_val[:150], y_val=d.y_val[:150].astype(np.float32),
             x_test=d.x_test[:200], y_test=d.y_test[:200].astype(np.float32))
    return path


@pytest.fixture(scope="module")
def registered_regressor(mlflow_server, data_npz) -> str:
    """A tiny MLP trained in seconds to predict the digit's value, registered as `digit-regressor@champion`."""
    import torch

    arrays = np.load(data_npz)
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"]).view(-1, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    register_champion(mlflow_server.uri, model.eval(), "digit-regressor", "tests-regression")
    return SOURCE


def write_recipe(path: Path, data_npz: Path, quantize: dict, **over) -> Path:
    d = {
        "source": SOURCE,
        "data": {"provider": "npz", "args": {"path": str(data_npz)}},
        "stages": [{"quantize": {"num_samples": 256, **quantize}}],
        "task": {"kind": "regression", "tolerance": 0.5, "gate": GATE},
        "evaluate": FAST,
        "register": {"alias": "edge-candidate", "experiment": "tests-regression"},
        **over,
    }
    path.write_text(yaml.safe_dump(d))
    return path


def edgeslim_run(recipe: Path, workdir: Path, uri: str, env: dict):
    return run_cli("run", str(recipe), "--tracking-uri", uri, "--workdir", str(workdir), env=env)


@pytest.fixture(scope="module")
def ptq_run(mlflow_server, registered_regressor, data_npz, env, tmp_path_factory):
    wd = tmp_path_factory.mktemp("regression-ptq")
    recipe = write_recipe(wd / "recipe.yaml", data_npz, {"method": "ptq", "calibrator": "percentile"},
                          register={"name": "digit-regressor-edge", "alias": "edge-candidate",
                                    "experiment": "tests-regression"})
    return edgeslim_run(recipe, wd / "out", mlflow_server.uri, env), wd / "out"


def python(code: str, env: dict, stdin: str | None = None):
    return run_process([sys.executable, "-c", textwrap.dedent(code)], timeout=600, env=env, input=stdin)


def test_run_with_ptq_gates_registers_and_reports_the_plugins_task(ptq_run, mlflow_server):
    proc, out = ptq_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["gate"]["passed"] is True
    assert [c["name"] for c in rep["gate"]["checks"]] == ["mae_increase", "sqnr_db"]
    assert rep["task"] == {"kind": "regression", "tolerance": 0.5, "gate": GATE}
    assert rep["metric_name"] == "within_tolerance" and rep["test_samples"] == 200
    assert 0.0 <= rep["candidate"]["metric"] <= 100.0
    assert rep["candidate"]["regression"]["mae"] - rep["source"]["regression"]["mae"] <= GATE["max_mae_increase"]
    # The plugin's rows in the summary table, its chart in the page, its figures in the report
    assert "mean absolute error" in proc.stdout and "within tolerance (%)" in proc.stdout
    html = (out / "report.html").read_text()
    assert 'id="chart-regression-mae"' in html and "<svg" in html.split('id="chart-regression-mae"')[1][:200]
    assert set(rep["figures"]["mae_by_value"]) == {"fp32", "int8"}

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    mv = client.get_model_version_by_alias("digit-regressor-edge", "edge-candidate")
    assert mv.version == rep["registered"]["version"]
    parent = client.get_model_version("digit-regressor", "1")
    assert mv.tags["edgeslim.parent_name"] == "digit-regressor" and mv.tags["edgeslim.parent_version"] == "1"
    assert mv.tags["edgeslim.parent_run_id"] == parent.run_id
    assert mv.tags["edgeslim.recipe_hash"] == rep["recipe_hash"]
    assert float(mv.tags["edgeslim.metric.sqnr_db"]) == pytest.approx(rep["candidate"]["fidelity"]["sqnr_db"])
    run = client.get_run(rep["registered"]["run_id"])
    assert (parent.model_id or parent.source.split("/")[1]) in [m.model_id for m in run.inputs.model_inputs or []]


@pytest.fixture(scope="module")
def edge_model_dir(ptq_run, mlflow_server, tmp_path_factory) -> Path:
    import mlflow

    assert ptq_run[0].returncode == 0, ptq_run[0].stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server.uri)
    return Path(mlflow.artifacts.download_artifacts("models:/digit-regressor-edge@edge-candidate",
                                                    dst_path=str(tmp_path_factory.mktemp("edge-model"))))


def test_the_edge_model_records_the_plugins_task_and_serves_its_prediction(edge_model_dir, ptq_run, mlflow_server,
                                                                            data_npz, env):
    meta = json.loads((edge_model_dir / "edge_meta.json").read_text())
    assert meta["task"] == {"kind": "regression", "tolerance": 0.5, "gate": GATE}
    proc = python(f"""
        import json, mlflow, numpy as np
        x = np.load({str(data_npz)!r})["x_test"][:5]
        out = mlflow.pyfunc.load_model("models:/digit-regressor-edge@edge-candidate").predict(x)
        print(json.dumps({{"keys": sorted(out), "value": np.asarray(out["value"]).tolist(),
                           "raw": np.asarray(out["output"]).reshape(-1).tolist()}}))
    """, {**env, "MLFLOW_TRACKING_URI": mlflow_server.uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["keys"]) == {"backend", "output", "value"}
    assert got["value"] == [int(np.rint(v)) for v in got["raw"]]


def test_the_device_health_check_runs_the_plugins_runtime(edge_model_dir, env, tmp_path):
    # The controller builds the release's check (with the plugin installed where it runs) ...
    proc = python(f"""
        import json
        from pathlib import Path
        from edgeslim.deploy.golden import golden_check
        from edgeslim.deploy.rollout_config import WaveRolloutConfig
        print(json.dumps(golden_check(Path({str(edge_model_dir)!r}), WaveRolloutConfig())))
    """, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads(proc.stdout.strip().splitlines()[-1])
    assert check["task"]["kind"] == "regression"
    assert len(check["values"]) == 2  # the input example: two calibration samples, their rounded values

    def health(check, env):
        p = run_process([sys.executable, "-m", "edgeslim.deploy.agent.health"], timeout=600, env=env,
                        input=json.dumps({"release": str(edge_model_dir), "check": check}))
        return json.loads(p.stdout.strip().splitlines()[-1].split(" ", 1)[1])

    # ... and a device with the plugin installed passes it,
    ok = health(check, env)
    assert ok["ok"] is True and ok["error"] is None, ok
    # fails it with the plugin's reason when its outputs are not the golden ones,
    from edgeslim.components.common.arrays import decode_array, encode_array

    bad = {**check, "outputs": {k: encode_array(decode_array(v) + 3.0) for k, v in check["outputs"].items()}}
    failed = health(bad, env)
    assert failed["ok"] is False and failed["error"].startswith("regression: the predicted values moved"), failed
    # and a device without the plugin refuses the check in one line naming the entry-point group.
    bare = health(check, {"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert bare["ok"] is False and "unknown task kind 'regression'" in bare["error"], bare
    assert "edgeslim.tasks" in bare["error"]


def test_run_with_the_search_uses_the_plugins_strategy(mlflow_server, registered_regressor, data_npz, env, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", data_npz,
                          {"method": "auto", "calibrators": ["minmax", "percentile"]},
                          register={"name": "digit-regressor-auto", "alias": "edge-candidate",
                                    "experiment": "tests-regression"})
    proc = edgeslim_run(recipe, tmp_path / "out", mlflow_server.uri, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["gate"]["passed"] is True and rep["registered"]["name"] == "digit-regressor-auto"
    q = rep["candidate"]["quantization"]
    assert q["chosen_on"] == "val" and q["winner"]["passed"] is True
    assert {"metric", "mae", "mae_increase", "sqnr_db"} <= set(q["trials"][0])
    assert q["trials"][0]["calibrator"] == "minmax"
    assert "mean absolute error" in proc.stdout

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    trials = client.search_runs([client.get_experiment_by_name("tests-regression").experiment_id],
                                f"tags.mlflow.parentRunId = '{rep['runs']['quantize']}'")
    assert len(trials) == len(q["trials"]) and "mae" in trials[0].data.metrics
    mv = client.get_model_version_by_alias("digit-regressor-auto", "edge-candidate")
    assert mv.tags["edgeslim.parent_name"] == "digit-regressor"


def test_a_search_no_trial_passes_says_what_the_plugin_would_change(mlflow_server, registered_regressor, data_npz,
                                                                    env, tmp_path):
    # QAT is on by default; the regression task has none, so the search skips it and says so.
    recipe = write_recipe(tmp_path / "recipe.yaml", data_npz, {"method": "auto", "calibrators": ["minmax"]},
                          task={"kind": "regression", "gate": {"min_sqnr_db": 200.0}},
                          register={"name": "digit-regressor-never", "alias": "edge-candidate",
                                    "experiment": "tests-regression"})
    proc = edgeslim_run(recipe, tmp_path / "out", mlflow_server.uri, env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "no regression candidate passed the regression gate" in proc.stderr
    assert "QAT could not run (the regression task has no QAT); try another calibrator, or loosen task.gate" \
        in proc.stderr
    from mlflow import MlflowClient

    assert MlflowClient(mlflow_server.uri).search_model_versions("name='digit-regressor-never'") == []


def test_init_writes_the_plugins_recipe_and_refuses_a_misspelt_task(data_npz, env, tmp_path):
    out = tmp_path / "recipe.yaml"
    proc = run_cli("init", "--source", SOURCE, "--npz", str(data_npz), "--task", "regression", "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "kind: regression" in text and "max_mae_increase" in text
    # --task auto: the float labels are the plugin's, and it says so
    auto = run_cli("init", "--source", SOURCE, "--npz", str(data_npz), "-o", str(tmp_path / "auto.yaml"), env=env)
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "auto.yaml").read_text())["task"]["kind"] == "regression"
    typo = run_cli("init", "--source", SOURCE, "--npz", str(data_npz), "--task", "regresion", "-o",
                   str(tmp_path / "t.yaml"), env=env)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    lines = [ln for ln in typo.stderr.splitlines() if ln.startswith("edgeslim: error:")]
    assert len(lines) == 1 and "did you mean 'regression'" in lines[0], typo.stderr[-2000:]
