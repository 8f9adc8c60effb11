"""The registered edge model records the recipe's data.preprocess (a real MLflow server), so the
edge pyfunc and the device health check can apply it too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.image_datasets import write_imagefolder

pytestmark = pytest.mark.slow


def test_register_records_the_preprocessing_in_the_edge_model(mlflow_server, tmp_path):
    import mlflow

    from edgeslim.components.common.data import describe_data, load_data
    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.tasks.classification.evaluate import evaluate
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.recipe import EvaluateConfig, recipe_from_dict
    from edgeslim.components.register import register

    write_imagefolder(tmp_path / "images", counts=(40, 10, 10))
    preprocess = {"resize": 20, "center_crop": 16, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    recipe = recipe_from_dict({"source": "models:/image-net@champion", "tracking_uri": mlflow_server.uri,
                               "data": {"provider": "imagefolder", "args": {"root": str(tmp_path / "images")},
                                        "preprocess": preprocess},
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
    local = mlflow.artifacts.download_artifacts(f"models:/{res.metrics['name']}/{res.metrics['version']}",
                                                dst_path=str(tmp_path / "dl"))
    meta = json.loads((Path(local) / "edge_meta.json").read_text())
    assert meta["preprocess"] == d.preprocess.to_dict()
    assert meta["preprocess"]["center_crop"] == 16 and meta["preprocess"]["layout"] == "NCHW"
