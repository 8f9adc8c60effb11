"""A detector through the whole pipeline (`edgeslim run`, Kubeflow's local runner, a real `mlflow server`),
and the detection recipe's bad inputs: one clear line, a non-zero exit, nothing registered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import register_champion, run_cli

pytestmark = pytest.mark.slow

DATA = {"provider": "digits-detect", "args": {"seed": 0, "n_train": 240, "n_val": 48, "n_test": 64}}
HEADS = [{"box": f"output_{2 * i}", "cls": f"output_{2 * i + 1}", "stride": s} for i, s in enumerate((4, 8, 16))]


def write_recipe(path: Path, source: str, task_over: dict | None = None, **over) -> Path:
    task = {"kind": "detection", "num_classes": 10, "score_threshold": 0.25,
            "decoder": {"box_encoding": "ltrb", "heads": HEADS},
            # A tiny detector trained for seconds: the gate is loose, the wiring is what is tested.
            "gate": {"max_map_drop": 5.0, "max_tp_score_drop": 0.1, "max_recall_drop": 10.0}}
    task.update(task_over or {})
    d = {"source": source, "data": DATA, "task": task,
         "stages": [{"quantize": {"method": "auto", "calibrators": ["percentile"], "num_samples": 64,
                                  "max_float_layers": 3, "qat": False}}],
         "evaluate": {"latency_warmup": 1, "latency_repeats": 2, "latency_batches": [1]},
         "register": {"alias": "edge-candidate", "experiment": "tests-detect"}}
    d.update(over)
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def registered_detector(mlflow_server):
    import torch

    from edgeslim.components.reference.detector import DigitsDetector, train_detector
    from edgeslim.components.common.data import load_data

    data = load_data(DATA["provider"], DATA["args"])
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine: avoid OpenMP oversubscription
    try:
        model = train_detector(DigitsDetector(width=8, head_hidden=8), data.x_train, data.y_train, epochs=3,
                               batch_size=32)
    finally:
        torch.set_num_threads(threads)
    return register_champion(mlflow_server.uri, model, "tiny-detector", "tests-reference")


def versions(uri: str, name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient(uri).search_model_versions(f"name='{name}'")


def assert_one_line_error(proc, needles: list[str], code: int = 2):
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgeslim: error:")]
    assert len(err) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in err[0], err[0]


def test_detector_runs_end_to_end_and_is_registered_with_detection_metrics(mlflow_server, registered_detector,
                                                                           tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", registered_detector)
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["metric_name"] == "map50"
    src, cand = rep["source"]["detection"], rep["candidate"]["detection"]
    for k in ("map50", "map50_95", "per_class_ap50", "precision", "recall", "mean_tp_score"):
        assert k in src and k in cand
    assert src["map50"] > 0  # the tiny detector finds digits
    assert rep["gate"]["passed"] and {c["name"] for c in rep["gate"]["checks"]} == {
        "map50_drop", "map50_95_drop", "mean_tp_score_drop", "recall_drop", "min_recall"}
    q = rep["candidate"]["quantization"]
    assert q["trials"] and q["trials"][0]["calibrator"] == "percentile"
    assert all(f"output_{i}" in q["ranges"] for i in range(6))  # the score heads' ranges are in the report
    assert "mean true-positive score" in proc.stdout
    assert rep["registered"]["name"] == "tiny-detector-edge"
    assert len(versions(mlflow_server.uri, "tiny-detector-edge")) == 1


def test_outputs_that_do_not_match_the_heads_are_one_line_naming_the_shapes(mlflow_server, registered_detector,
                                                                             tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", registered_detector, task_over={"num_classes": 80})
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, ["task.decoder.heads[0].cls", "[N, 80, H, W]", "[2, 10, 12, 12]"])
    wrong = write_recipe(tmp_path / "w.yaml", registered_detector, task_over={
        "decoder": {"heads": [{"box": "boxes", "cls": "scores", "stride": 8}]}})
    proc = run_cli("run", str(wrong), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, ["no output 'boxes'", "output_0 [2, 4, 12, 12]"])


def test_a_decode_function_that_cannot_be_imported_is_one_line(mlflow_server, registered_detector, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", registered_detector,
                          task_over={"decode_fn": "nowhere_decoders:decode", "decoder": {"heads": []}})
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, ["task.decode_fn", "cannot import module 'nowhere_decoders'"])


def test_labels_with_boxes_outside_the_image_are_one_line(mlflow_server, registered_detector, tmp_path):
    from edgeslim.components.common.data import load_data

    d = load_data(DATA["provider"], {**DATA["args"], "n_train": 8, "n_val": 4, "n_test": 4})
    arrays = {k: getattr(d, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][1] = np.array([[30, 30, 60, 40, 3]], np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    recipe = write_recipe(tmp_path / "r.yaml", registered_detector,
                          data={"provider": "npz", "args": {"path": str(tmp_path / "bad.npz")}})
    before = len(versions(mlflow_server.uri, "tiny-detector-edge"))
    proc = run_cli("run", str(recipe), "--tracking-uri", mlflow_server.uri, "--workdir", str(tmp_path / "o"))
    assert_one_line_error(proc, ["y_test[1]", "outside the 48x48 image"])
    assert len(versions(mlflow_server.uri, "tiny-detector-edge")) == before  # nothing registered


def test_init_reads_a_detectors_heads_from_its_outputs_and_writes_a_recipe_run_accepts(
        mlflow_server, registered_detector, tmp_path):
    import torch

    from edgeslim.components.recipe import load_recipe
    from edgeslim.components.tasks.detection.runtime import check_outputs
    from edgeslim.components.pull import pull
    from edgeslim.components.common.data import load_data

    d = load_data(DATA["provider"], {**DATA["args"], "n_train": 16, "n_val": 4, "n_test": 4})
    arrays = {k: getattr(d, k) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
    np.savez(tmp_path / "det.npz", **arrays)
    out = tmp_path / "recipe.yaml"
    proc = run_cli("init", "--source", registered_detector, "--npz", str(tmp_path / "det.npz"),
                   "--tracking-uri", mlflow_server.uri, "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = load_recipe(out)
    assert r.task.kind == "detection" and r.task.num_classes == 10
    assert [(h.box, h.cls, h.stride) for h in r.task.decoder.heads] == [(h["box"], h["cls"], h["stride"]) for h in HEADS]
    assert r.task.decoder.scores == "sigmoid"  # DigitsDetector's class maps end in a sigmoid
    assert r.stages[-1].method == "auto" and r.stages[-1].placement == "weighted" and r.data.provider == "npz"
    # what `edgeslim run` checks before anything runs: the heads match the model's outputs
    model = pull(registered_detector, tracking_uri=mlflow_server.uri, out_dir=tmp_path / "m").model
    with torch.no_grad():
        outs = model(torch.from_numpy(d.x_val[:2]))
    check_outputs([f"output_{i}" for i in range(len(outs))], [list(o.shape) for o in outs], r.task)

    # class labels asked to be a detector: one line
    cls = {k: (np.zeros(len(v), np.int64) if k.startswith("y_") else v) for k, v in arrays.items()}
    np.savez(tmp_path / "cls.npz", **cls)
    bad = run_cli("init", "--source", registered_detector, "--npz", str(tmp_path / "cls.npz"), "--task", "detection",
                  "--tracking-uri", mlflow_server.uri, "-o", str(tmp_path / "bad.yaml"))
    assert_one_line_error(bad, ["y_train does not hold detection labels; detection needs boxes"])
    assert not (tmp_path / "bad.yaml").exists()
