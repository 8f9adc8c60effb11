"""The recipe ``edgeslim init`` writes for a segmenter: its format, class count and outputs read from the
model's outputs on a few validation images (per-pixel logits: semantic; a decoded ``(N, 4+classes+nm, A)``
output beside ``(N, nm, h, w)`` prototypes: ``yolo-seg``), checked against the labels, and its gate."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.task_init import auto_quantize_stages, probe_outputs, recipe_closing, recipe_opening

INIT_TEMPLATE = recipe_opening(
    "segmenter", "# Segmentation labels: y_* are class maps, one class id per input pixel ((N, H, W) integer arrays,\n"
    "# or the masks provider's PNGs).") + auto_quantize_stages(
    "PTQ per calibrator, then the most sensitive layers kept in float", 256) + """\
      qat: false                     # a segmenter has no QAT twin
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
""" + recipe_closing()


INSTANCE_TEMPLATE = recipe_opening(
    "instance segmenter",
    "# Instance labels: y_* are object arrays, y[i] a (k, H, W) uint8 stack whose instance j holds its class + 1."
) + auto_quantize_stages("PTQ per calibrator, then the output tails (decoded, prototypes) in float", 256) + """\
      qat: false
      float_layers: []               # ONNX node names or patterns always kept in float

# Read from the model's outputs on {n_probe} validation image(s): {outputs}
task:
  kind: segmentation
  format: yolo-seg
  num_classes: {num_classes}                   # {num_classes_why}
  score_threshold: 0.25              # your deployment threshold: precision/recall are reported at it
  decoder:
    output: {det}
    proto: {proto}
    nms_iou: 0.7
    min_score: 0.01
    max_detections: 100
    mask_threshold: 0.5
  # loss_fn: mypkg.losses:loss       # distill/prune's label loss (default: Ultralytics' v8SegmentationLoss)
  gate:
    max_mask_map_drop: 1.0           # points of mask mAP@0.5
    max_mask_map50_95_drop: 1.0      # points of mask mAP@0.5:0.95
    max_tp_score_drop: 0.05          # mean true-positive score: catches collapsed confidence
""" + recipe_closing()


def _instance_fields(data, load_model: Callable) -> dict[str, str]:
    import numpy as np

    probe = probe_outputs(data, load_model)
    names, shapes, actual = probe.names, probe.shapes, probe.described()
    det = [(n, s) for n, s in zip(names, shapes) if len(s) == 3]
    proto = [(n, s) for n, s in zip(names, shapes) if len(s) == 4]
    if len(det) != 1 or len(proto) != 1 or det[0][1][1] <= 4 + proto[0][1][1]:
        raise ConfigError(f"the labels are instances but the model's outputs ({actual}) are not a decoded "
                          "(N, 4+classes+masks, A) output beside (N, masks, h, w) prototypes; log an Ultralytics "
                          "segmentation model in eval mode (YOLO('best.pt').model.eval())")
    nc = det[0][1][1] - 4 - proto[0][1][1]
    seen = [int(np.asarray(y).max()) - 1 for y in data.y_train[:64] if np.asarray(y).size]
    top = max(seen) if seen else 0
    if top >= nc:
        raise ConfigError(f"the labels hold class {top} but the model's head has {nc} classes; check the labels")
    return {"num_classes": str(nc), "det": det[0][0], "proto": proto[0][0], **probe.fields(),
            "num_classes_why": f"from the model's {det[0][0]} ({det[0][1][1]} channels: 4 box "
            f"values + classes + {proto[0][1][1]} mask coefficients)"}


def _task_fields(data, load_model: Callable) -> dict[str, str]:
    import numpy as np

    labels = np.asarray(data.y_val[:2] if len(data.y_val) else data.y_train[:2])
    probe = probe_outputs(data, load_model)
    names, shapes, actual = probe.names, probe.shapes, probe.described()
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
    return {"num_classes": str(shape[1]), "logits_output": name, "ignore_index": str(ignore), **probe.fields(),
            "num_classes_why": f"the channels of {name} (the labels use classes up to {top})"}


def init_recipe(*, source: str, output: Path, data: str, edge_name: str, splits, load_model: Callable) -> str:
    if splits is None:
        raise ConfigError("--task segmentation needs segmentation data: --npz PATH (y_* integer class maps of "
                          "shape (N, H, W), or object arrays of (k, H, W) instance stacks) or --data masks "
                          "--data-arg root=FOLDER")
    if splits.y_train.dtype == object:
        return INSTANCE_TEMPLATE.format(source=source, output=output, data=data, edge_name=edge_name,
                                        **_instance_fields(splits, load_model))
    return INIT_TEMPLATE.format(source=source, output=output, data=data, edge_name=edge_name,
                                **_task_fields(splits, load_model))
