"""The registered edge model records the recipe's data.preprocess (a real MLflow server), so the
edge pyfunc and the device health check can apply it too; through ``mlflow.pyfunc.load_model`` the
model takes raw images as well as its input tensors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from edgeslim.components.common.image_preprocess import preprocess_image

from tests.image_datasets import write_imagefolder

pytestmark = pytest.mark.slow

PRE = {"resize": 20, "center_crop": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """One classifier compressed from an imagefolder recipe and registered: (register's metrics, the
    recipe's data config, three image files of its test split, their preprocessed tensors)."""
    from edgeslim.components.common.data import describe_data, load_data
    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.recipe import EvaluateConfig, recipe_from_dict
    from edgeslim.components.register import register
    from edgeslim.components.tasks.classification.evaluate import evaluate

    tmp_path = tmp_path_factory.mktemp("image-register")
    files = write_imagefolder(tmp_path / "images", counts=(40, 10, 10))
    recipe = recipe_from_dict({"source": "models:/image-net@champion", "tracking_uri": mlflow_server.uri,
                               "data": {"provider": "imagefolder", "args": {"root": str(tmp_path / "images")},
                                        "preprocess": PRE},
                               "register": {"experiment": "image-data"}})
    d = recipe.data
    data = load_data(d.provider, d.args, d.preprocess)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    fp32 = export(model.eval(), OnnxExportConfig(), data=data, out_path=tmp_path / "m.onnx").model
    q = quantize(fp32, PTQQuantizeConfig(num_samples=16), data=data, out_dir=tmp_path / "q").model
    ev = evaluate(q, EvaluateConfig(latency_batches=[1], latency_warmup=1, latency_repeats=1), parent_onnx=fp32,
                  data=data).metrics
    res = register(q, parent={"name": "image-net", "version": "1"}, recipe=recipe, evaluation=ev,
                   gate_result={"passed": True, "summary": "passed (test)"}, calibration=data.calibration(16),
                   data_description=describe_data(d.provider, d.args, d.preprocess), tracking_uri=mlflow_server.uri)
    paths = [p for p, _ in files["test"]][:3]
    # the tensors of those files, by the preprocessing calibration and evaluation used
    x = np.stack([preprocess_image(Image.open(p), d.preprocess) for p in paths])
    return res.metrics, d, paths, x


def test_register_records_the_preprocessing_in_the_edge_model(registered, tmp_path):
    import mlflow

    metrics, d, _, _ = registered
    local = mlflow.artifacts.download_artifacts(f"models:/{metrics['name']}/{metrics['version']}",
                                                dst_path=str(tmp_path / "dl"))
    meta = json.loads((Path(local) / "edge_meta.json").read_text())
    assert meta["preprocess"] == d.preprocess.to_dict()
    assert meta["preprocess"]["center_crop"] == 16 and meta["preprocess"]["layout"] == "NCHW"


def test_the_registered_pyfunc_takes_raw_images_and_tensors(registered):
    import mlflow.pyfunc

    from edgeslim.deploy.predict_input import tensor_inputs

    metrics, _, paths, x = registered
    pyfunc = mlflow.pyfunc.load_model(f"models:/{metrics['name']}@{metrics['alias']}")
    blobs = [p.read_bytes() for p in paths]
    by_bytes = pyfunc.predict({"images": blobs})
    by_frame = pyfunc.predict(pd.DataFrame({"image": blobs}))
    by_base64 = pyfunc.predict({"images": [base64.b64encode(b).decode() for b in blobs]})
    # the test split's tensors are the same files through the same preprocessing
    by_tensor = pyfunc.predict(x)
    out = [k for k in by_tensor if k != "backend"][0]
    assert by_tensor[out].shape[0] == 3
    for got in (by_bytes, by_frame, by_base64):
        np.testing.assert_allclose(got[out], by_tensor[out], atol=1e-4)
    # the signature still describes the outputs, and the tensors the model takes are recorded beside it
    schema = tensor_inputs(pyfunc.metadata)
    assert pyfunc.metadata.get_output_schema() is not None
    assert schema.input_names() and tuple(schema.inputs[0].shape) == (-1, 3, 16, 16)


def test_bad_input_to_the_registered_pyfunc_is_one_line_naming_the_fix(registered):
    import mlflow.pyfunc

    from edgeslim.components.common.errors import DataError, SourceError

    metrics, _, paths, _ = registered
    pyfunc = mlflow.pyfunc.load_model(f"models:/{metrics['name']}@{metrics['alias']}")
    cases = [
        ({"images": [b"not an image"]}, DataError, r"images\[0\]: not a readable image"),
        ({"images": [np.zeros((16, 16, 3), np.float32)]}, DataError, r"images\[0\].*float32.*uint8"),
        ({"images": ["%%% not base64"]}, DataError, r"images\[0\]: text that is not base64"),
        (np.array([["a", "b"]]), SourceError, r"got an array of <U1; give numbers.*\"images\""),
        (np.zeros((2, 3, 20, 20), np.float32), SourceError, r"got shape \(2, 3, 20, 20\); the model takes "
                                                             r"\(N, 3, 16, 16\)"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message) as err:
            pyfunc.predict(bad)
        assert "\n" not in str(err.value)


def test_fleet_predict_input_passes_images_through(registered):
    """``mlflow deployments predict -t edge:/...`` reads its JSON with pandas; images in it reach the
    pyfunc as ``{"images": [...]}``."""
    import io

    import mlflow.pyfunc

    from edgeslim.deploy.predict_input import model_input, tensor_inputs

    metrics, _, paths, x = registered
    pyfunc = mlflow.pyfunc.load_model(f"models:/{metrics['name']}/{metrics['version']}")
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in paths[:2]]
    want = pyfunc.predict(x[:2])
    out = [k for k in want if k != "backend"][0]
    for body in ({"inputs": {"images": b64}}, {"image": b64}):
        frame = pd.read_json(io.StringIO(json.dumps(body)))
        got = pyfunc.predict(model_input(frame, tensor_inputs(pyfunc.metadata)))
        np.testing.assert_allclose(got[out], want[out], atol=1e-4)
    # tensors still reshape from flat rows, from the recorded tensor inputs
    rows = pd.DataFrame(x[:2].reshape(2, -1))
    got = pyfunc.predict(model_input(rows, tensor_inputs(pyfunc.metadata)))
    np.testing.assert_allclose(got[out], want[out], atol=1e-4)


def test_mlflow_serving_takes_base64_images(registered):
    """MLflow's scoring app (what ``mlflow models serve`` runs) over the registered model: images as
    base64 text in ``inputs`` or in a ``dataframe_split`` ``image`` column."""
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    metrics, _, paths, x = registered
    pyfunc = mlflow.pyfunc.load_model(f"models:/{metrics['name']}@{metrics['alias']}")
    want = pyfunc.predict(x)
    out = [k for k in want if k != "backend"][0]
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    client = TestClient(scoring_server.init(pyfunc))
    for body in ({"inputs": {"images": b64}},
                 {"dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}},
                 {"inputs": x.tolist()}):
        resp = client.post("/invocations", json=body)
        assert resp.status_code == 200, resp.text
        np.testing.assert_allclose(np.asarray(resp.json()["predictions"][out]), want[out], atol=1e-4)
    resp = client.post("/invocations", json={"inputs": {"images": ["%%% not base64"]}})
    assert resp.status_code >= 400 and "not base64" in resp.text


def test_the_documented_pyfunc_block_runs(registered, mlflow_server, tmp_path, monkeypatch, capsys):
    from tests.docs_blocks import doc_block

    _, _, paths, _ = registered
    (tmp_path / "photo.png").write_bytes(paths[0].read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    exec(compile(doc_block("docs/data.md", "pyfunc-images"), "docs/data.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("onnxruntime:") and "(1, 10)" in printed
