"""A release's golden health check: the input and expected outputs that every device must reproduce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeslim.deploy.manifest import decode_array, encode_array
from edgeslim.deploy.rollout_config import WaveRolloutConfig


def golden_check(model_dir: Path, cfg: WaveRolloutConfig) -> dict[str, Any]:
    """The manifest's health check.

    The golden input is, in order of preference: ``edge_meta.json["golden"]`` (input and
    expected outputs recorded by whoever logged the model), the model's MLflow input
    example (real samples; the pipeline logs two calibration images), or a seeded random
    input. Expected outputs not recorded are computed here with ONNX Runtime, which proves
    the device runs *this* model the same way. The model's task (``task`` in the metadata) adds
    what its runtime half compares on the device, and the check records the task: a detector's
    check carries the decoded golden detections and the ``iou``/``score_tol`` tolerances, and the
    device compares boxes, not raw maps.
    """
    import numpy as np

    from edgeslim.components.common.tasks import runtime_for

    meta_path = model_dir / "edge_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    golden = meta.get("golden")
    check: dict[str, Any] = {"atol": cfg.atol, "rtol": cfg.rtol, "latency_budget_ms": cfg.latency_budget_ms,
                             "repeats": cfg.health_repeats}
    if golden:
        x = np.asarray(golden["input"], dtype=np.float32) if not isinstance(golden["input"], dict) \
            else decode_array(golden["input"])
        outs = {k: decode_array(v) if isinstance(v, dict) else np.asarray(v, dtype=np.float32)
                for k, v in golden["outputs"].items()}
        source = "edge_meta.json"
    else:
        from edgeslim.components.common.onnx_runtime import make_session

        sess = make_session(model_dir / "model.onnx")
        inp = sess.get_inputs()[0]
        x, source = _input_example(model_dir, inp), "the model's input example, run by the controller with onnxruntime"
        if x is None:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            source = "a seeded random input, run by the controller with onnxruntime"
        outs = {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, {inp.name: x}))}
    check.update(input=encode_array(x), outputs={k: encode_array(v) for k, v in outs.items()}, source=source)
    # The task the model records adds what its device check compares (a detector's decoded golden boxes).
    meta_task = meta.get("task")
    check.update(runtime_for(meta_task).golden(outs, cfg))
    if meta_task is not None:
        check["task"] = meta_task
    return check


def _input_example(model_dir: Path, inp) -> Any:
    """The MLflow input example saved with the model, as float32 for input ``inp``; else None."""
    import numpy as np

    try:
        from mlflow.models import Model

        ex = Model.load(str(model_dir)).load_input_example(str(model_dir))
    except Exception:  # no example, or one MLflow cannot read back: fall back to a seeded input
        return None
    if isinstance(ex, dict):
        ex = ex.get(inp.name, next(iter(ex.values()), None))
    if ex is None:
        return None
    arr = np.asarray(ex, dtype=np.float32)
    rank = len(inp.shape)
    return arr if arr.ndim == rank else None
