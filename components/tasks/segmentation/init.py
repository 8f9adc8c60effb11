"""The recipe ``edgeslim init`` writes for a segmenter: the class count and logits output read from the
model's outputs on a few validation images, checked against the labels, and the segmentation gate."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeslim.components.common.errors import ConfigError

INIT_TEMPLATE = """\
# edgeslim recipe for the segmenter {source}
# Written by `edgeslim init`; run it with `edgeslim run {output}`.
# Every key is documented in the recipe reference (docs/recipe-reference.md).
version: 1

source: {source}

# Segmentation labels: y_* are class maps, one class id per input pixel ((N, H, W) integer arrays,
# or the masks provider's PNGs).
data:
{data}

stages:
  - export: {{opset: 18}}
  - quantize:
      method: auto                   # PTQ per calibrator, then the most sensitive layers kept in float
      calibrators: [percentile, entropy, mse, minmax]
      num_samples: 256
      max_float_layers: 3
      float_layers: []               # ONNX node names or patterns always kept in float

# Read from the model's outputs on {n_probe} validation image(s): {outputs}
task:
  kind: segmentation
  num_classes: {num_classes}                   # {num_classes_why}
  output: {logits_output}
  ignore_index: {ignore_index}                # label pixels that count for no class
  gate:
    max_miou_drop: 1.0               # points of mean IoU
    min_class_iou: 0.0               # points: a floor on the worst class's IoU (0: none)
    max_pixel_accuracy_drop: 1.0     # points of pixel accuracy

evaluate:
  latency_batches: [1, 8]
  latency_warmup: 3
  latency_repeats: 10

register:
  name: "{edge_name}"
  alias: edge-candidate
  experiment: edgeslim
"""


def _task_fields(data, load_model: Callable) -> dict[str, str]:
    import numpy as np
    import torch

    from edgeslim.components.common.model_outputs import forward_tensors, output_names

    probe = data.x_val[:2] if len(data.x_val) else data.x_train[:2]
    labels = np.asarray(data.y_val[:2] if len(data.y_val) else data.y_train[:2])
    outs = forward_tensors(load_model().eval(), torch.from_numpy(np.ascontiguousarray(probe, dtype=np.float32)))
    names = output_names(len(outs))
    shapes = [list(o.shape) for o in outs]
    actual = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
    logits = [(n, s) for n, s in zip(names, shapes) if len(s) == 4 and s[1] >= 2]
    if not logits:
        raise ConfigError(f"the model's outputs ({actual}) hold no per-pixel logits [N, classes, H, W]; a "
                          "segmenter must return them (wrap a model that returns a dict, e.g. torchvision's "
                          "{'out': ...}, in a module that returns the tensor)")
    name, shape = logits[0]
    seen = labels[(labels >= 0) & (labels < 255)]
    top = int(seen.max()) if seen.size else 0
    if top >= shape[1]:
        raise ConfigError(f"the labels hold class {top} but output {name} {shape} has {shape[1]} class channels; "
                          "check the masks' class ids, or register the model with one channel per class")
    ignore = 255 if shape[1] <= 255 else 65535
    return {"num_classes": str(shape[1]), "logits_output": name, "ignore_index": str(ignore), "n_probe": str(len(probe)),
            "outputs": actual, "num_classes_why": f"the channels of {name} (the labels use classes up to {top})"}


def init_recipe(*, source: str, output: Path, data: str, edge_name: str, splits, load_model: Callable) -> str:
    if splits is None:
        raise ConfigError("--task segmentation needs segmentation data: --npz PATH (y_* integer class maps of "
                          "shape (N, H, W)) or --data masks --data-arg root=FOLDER")
    return INIT_TEMPLATE.format(source=source, output=output, data=data, edge_name=edge_name,
                                **_task_fields(splits, load_model))
