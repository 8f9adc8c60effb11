"""The recipe ``edgeslim init`` writes for a detector: the decoder read from the model's outputs on a few
validation images, the class count from the labels, the detection gate."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.task_init import auto_quantize_stages, probe_outputs, recipe_closing, recipe_opening
from edgeslim.components.tasks.detection.runtime import infer_decoder

INIT_TEMPLATE = recipe_opening(
    "detector", "# Detection labels: y_* are object arrays, y[i] a (k, 5) [x1, y1, x2, y2, class] array in pixels.",
    '; docs/recipes.md, "Detection recipes"') + auto_quantize_stages(
    "PTQ per calibrator, then sensitive head layers kept in float", 512) + """\
      qat: false                     # true: QAT last, trained label-free to match the fp32 outputs (slow on CPU)
      placement: weighted            # Q/DQ only on conv inputs (TensorRT's placement): score outputs stay float
      float_layers: []               # ONNX node names or patterns always kept in float

# Read from the model's outputs on {n_probe} validation image(s): {outputs}
task:
  kind: detection
  num_classes: {num_classes}                  # {num_classes_why}
  score_threshold: 0.25              # your deployment threshold: precision/recall are reported at it
  decoder:
{decoder_layout}
    scores: {scores}                 # {scores_why}
    nms_iou: 0.5
    min_score: 0.01
    max_detections: 100
{heads}  # decode_fn: mypkg.decoders:decode   # instead of decoder: outputs -> per image (M, 6) [x1, y1, x2, y2, score, class]
  # loss_fn: mypkg.losses:loss       # distill/prune's label loss: loss_fn(outputs, targets, model) -> scalar tensor
  #                                  # (default: an Ultralytics model's own v8DetectionLoss, or edgeslim's for map pairs)
  gate:
    max_map_drop: 1.0                # points of mAP@0.5
    max_map50_95_drop: 2.0           # points of mAP@0.5:0.95: catches boxes that lost precision
    max_tp_score_drop: 0.05          # mean true-positive score: catches collapsed confidence
    max_recall_drop: 2.0             # points of recall at score_threshold
    min_recall: 0.0
{confidence}
""" + recipe_closing()


def _task_fields(data, load_model: Callable) -> dict[str, str]:
    """num_classes from the labels; heads and score activation from the model's outputs."""
    import numpy as np
    import torch

    classes = [int(c) for y in data.y_train for c in np.asarray(y)[:, 4]]
    if not classes:
        raise ConfigError("the training labels hold no boxes; detection needs labelled objects")
    num_classes = max(classes) + 1
    probe = probe_outputs(data, load_model)
    model, outs, names, shapes = probe.model, probe.outputs, probe.names, probe.shapes
    stride = getattr(model, "stride", None)  # Ultralytics models carry their strides
    model_strides = [float(v) for v in np.asarray(stride, dtype=np.float64).reshape(-1)] \
        if isinstance(stride, (torch.Tensor, list, tuple)) else []
    dec = infer_decoder(names, shapes, probe.images.shape[-2:], num_classes,
                        [s for s in model_strides if s.is_integer()] if len(model_strides) > 1 else [])
    fields = {"num_classes": str(num_classes), "num_classes_why": "from the labels (largest class + 1)"}
    if dec["format"] == "yolo-decoded":
        score_maps = [outs[names.index(dec["output"])][:, 4:].numpy()]
        strides = f"[{', '.join(str(s) for s in dec['strides'])}]"
        fields["decoder_layout"] = (
            "    format: yolo-decoded             # one (N, 4+classes, A) output: cx, cy, w, h in pixels, then scores\n"
            f"    output: {dec['output']}\n"
            f"    strides: {strides:<22}  # the levels' strides (fine-tuning uses them)")
        fields["heads"] = ""
        if dec["num_classes"] != num_classes:
            fields["num_classes"] = str(dec["num_classes"])
            fields["num_classes_why"] = (f"from the model's output ({shapes[0][1]} channels: 4 box values + classes); "
                                         f"the labels use {num_classes}")
    else:
        score_maps = [outs[names.index(h["cls"])].numpy() for h in dec["heads"]]
        fields["decoder_layout"] = (
            "    box_encoding: ltrb               # ltrb: distances from the cell centre in strides; "
            "xywh: offset + log size")
        fields["heads"] = "    heads:\n" + "\n".join(
            f"      - {{box: {h['box']}, cls: {h['cls']}, stride: {h['stride']}}}" for h in dec["heads"]) + "\n"
    bounded = all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in score_maps)
    return {
        **fields, **probe.fields(),
        "scores": "sigmoid" if bounded else "logits",
        "scores_why": ("the class scores stay in [0, 1]: the graph ends in a sigmoid" if bounded else
                       "the class scores leave [0, 1]: raw logits, the decoder applies the sigmoid"),
    }


def init_recipe(*, source: str, output: Path, data: str, edge_name: str, splits, load_model: Callable) -> str:
    if splits is None:
        raise ConfigError("--task detection needs detection data: --npz PATH (y_* object arrays of (k, 5) "
                          "[x1, y1, x2, y2, class] arrays in pixels) or --data yolo|coco with --data-arg")
    return INIT_TEMPLATE.format(source=source, output=output, data=data, edge_name=edge_name,
                                confidence=_split_advice(splits), **_task_fields(splits, load_model))


def _split_advice(splits) -> str:
    """The commented ``confidence:`` key, with the split sizes a bound of the default mAP@0.5 allowance needs
    (the labels' boxes per image count as the answers int8 can change)."""
    from edgeslim.components.common.confidence import split_advice
    from edgeslim.components.tasks.detection.config import DetectionGateConfig

    boxes = sum(len(y) for y in splits.y_train) / max(len(splits.y_train), 1)
    return split_advice(DetectionGateConfig().max_map_drop, "boxes", val=len(splits.y_val), test=len(splits.y_test),
                        units_per_image=max(boxes, 1.0), indent="    ")
