"""Accuracy-aware int8 for segmenters: the segmentation strategy of the one search
(:mod:`edgeslim.components.quantize.search`).

Trials are judged by the segmentation gate (mIoU drop, the worst class's IoU, pixel accuracy) against the
segmenter's own fp32 export on the validation split. The fallback ranks *output tails*
(:func:`~edgeslim.components.quantize.sensitivity.output_tails`: each graph output with the nodes that
produce it -- upsampling, the classifier convs, a head's sum -- back to and including its last weighted
layers, found from the graph, whatever the model): a model with several outputs has each tail measured
alone in int8, one output's tail ranks first unmeasured. Past the tails, the other conv layers are ranked
by a one-pass proxy (:func:`~edgeslim.components.quantize.sensitivity.layer_noise_proxy`: the SQNR of
each layer's own int8 rounding), so the search's cost does not grow with the number of layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.components.common.data import Splits
from edgeslim.components.quantize.search import Strategy
from edgeslim.components.quantize.tail_ranking import rank_output_tails

_RANKED = ("miou", "worst_class_iou", "pixel_accuracy", "sqnr_db")
_REFERENCE_BYTES = 256 << 20  # fp32 val logits kept for the trials' SQNR (the first images that fit)


class SegmenterStrategy(Strategy):
    """The segmentation gate against the fp32 segmenter on val; the fallback keeps output tails (and,
    past them, single layers) in float, the most damaging first."""

    task = "segmentation"
    candidate = "segmenter candidate"
    gate_name = "segmentation gate"
    group_noun = "layer(s) producing"
    fields = _RANKED
    table_key = "head_sensitivity"

    def __init__(self, fp32_onnx: str | Path, task, *, model=None):
        self.fp32_onnx, self.task_config, self.model = fp32_onnx, task, model
        self.table: list[dict[str, Any]] = []
        self._val_logits: list[np.ndarray] = []

    def reference(self, data: Splits) -> dict[str, Any]:
        kept, room = [], [_REFERENCE_BYTES]

        def keep(raw, *_):  # the first images' compared outputs, as many as fit (at least one)
            out = self._compared(*raw[0])
            per = max(out.nbytes // max(len(out), 1), 1)
            k = min(len(out), max(room[0] // per, 0 if kept else 1))
            if k:
                kept.append(out[:k].copy())
                room[0] -= k * per

        self.parent = self._metrics(self._run(self.fp32_onnx, data, keep))
        self._val_logits = kept
        return {"fp32_val": self.parent, "sqnr_val_images": int(sum(len(k) for k in kept))}

    def judge(self, candidate: str | Path, data: Splits) -> dict[str, Any]:
        from edgeslim.components.common.onnx_runtime import SqnrAccumulator

        sqnr, done = SqnrAccumulator(), [0]
        ref = np.concatenate(self._val_logits) if self._val_logits else np.zeros((0,))

        def compare(raw, *_):  # SQNR against fp32's outputs on the images kept
            out = self._compared(*raw[0])
            start, n = done[0], len(out)
            done[0] += n
            m = max(0, min(n, len(ref) - start))
            if m:
                sqnr.add(ref[start:start + m], out[:m])

        m = self._metrics(self._run(candidate, data, compare))
        verdict = self._verdict(m)
        return {**{k: m[k] for k in self.fields[:3]}, "sqnr_db": round(sqnr.db(), 3), "passed": verdict["passed"],
                "gate": verdict["summary"]}

    def _compared(self, outs: list[np.ndarray], names: list[str]) -> np.ndarray:
        """What a trial's output SQNR is measured on, of a batch's outputs: the logits."""
        from edgeslim.components.tasks.segmentation.runtime import logits_output

        return logits_output(dict(zip(names, outs)), self.task_config)

    def _run(self, onnx_path, data: Splits, on_batch):
        """The model on val (``on_batch`` sees each batch's raw outputs): what :meth:`_metrics` reads."""
        from edgeslim.components.tasks.segmentation.evaluate import segment_batches

        (cm,) = segment_batches([onnx_path], data.x_val, data.y_val, self.task_config, on_batch=on_batch)
        return cm

    def _metrics(self, cm) -> dict[str, Any]:
        from edgeslim.components.tasks.segmentation.evaluate import segmentation_metrics

        return segmentation_metrics(cm)

    def _verdict(self, m: dict[str, Any]) -> dict[str, Any]:
        from edgeslim.components.tasks.segmentation.evaluate import gate_segmentation

        return gate_segmentation({"source": {"segmentation": self.parent}, "candidate": {"segmentation": m}},
                                 self.task_config.gate)

    def damage(self, row: dict[str, Any]) -> float:
        # Points of mIoU, of the worst class's IoU and of pixel accuracy lost against fp32.
        p = self.parent
        return ((p["miou"] - row["miou"]) + (p["worst_class_iou"] - row["worst_class_iou"])
                + (p["pixel_accuracy"] - row["pixel_accuracy"]))

    def key(self, row: dict[str, Any]) -> tuple:
        return row["passed"], -self.damage(row), row["sqnr_db"]

    def rank(self, fp32_onnx, config, *, calibrator, ranges, data, out_dir, pinned):
        return rank_output_tails(self, self.fields, fp32_onnx, config, calibrator=calibrator, ranges=ranges,
                                 data=data, out_dir=out_dir, pinned=pinned, skip_pinned_tails=False)

    def figures(self, row: dict[str, Any]) -> str:
        p = self.parent
        return (f"mIoU {row['miou']:.2f} vs fp32 {p['miou']:.2f}, worst class IoU {row['worst_class_iou']:.2f} "
                f"vs {p['worst_class_iou']:.2f}")

    def fix(self, config, qat_ran: bool) -> str:
        skipped = f"QAT could not run ({self.qat_skipped}); " if config.qat and self.qat_skipped else ""
        return skipped + ("raise quantize.max_float_layers" if config.max_float_layers < len(self.table) or
                          not self.table else "loosen task.gate") + ", or try another calibrator"

    def result_metrics(self, row, res):
        return {"calibrator": row["calibrator"], "float_layers": res.metrics.get("float_layers", []),
                "ranges": res.metrics.get("ranges", {})}


_INSTANCE_RANKED = ("mask_map50", "mask_map50_95", "mean_tp_score", "sqnr_db")


class InstanceStrategy(SegmenterStrategy):
    """``yolo-seg``: the instance gate (mask mAP drops, mean true-positive score) against the fp32 export on
    val. The fallback's output tails are found from the graph: the decoded output's (box and score convs,
    the DFL, the mask-coefficient convs) and the prototypes' (the proto branch), each measured alone in
    int8, then single layers by the one-pass proxy."""

    candidate = "instance segmenter candidate"
    gate_name = "instance segmentation gate"
    fields = _INSTANCE_RANKED

    def _compared(self, outs: list[np.ndarray], names: list[str]) -> np.ndarray:
        """Every raw output, flattened and joined per image."""
        return np.concatenate([o.reshape(len(o), -1) for o in outs], 1)

    def _run(self, onnx_path, data: Splits, on_batch):
        from edgeslim.components.tasks.segmentation.instance_eval import instance_batches

        (recs,) = instance_batches([onnx_path], data.x_val, data.y_val, self.task_config, on_batch=on_batch)
        return recs

    def _metrics(self, recs) -> dict[str, Any]:
        from edgeslim.components.tasks.segmentation.instance_eval import instance_metrics

        return instance_metrics(recs, self.task_config.num_classes, self.task_config.score_threshold)

    def _verdict(self, m: dict[str, Any]) -> dict[str, Any]:
        from edgeslim.components.tasks.segmentation.instance_eval import gate_instances

        return gate_instances({"source": {"instance_segmentation": self.parent},
                               "candidate": {"instance_segmentation": m}}, self.task_config.gate)

    def damage(self, row: dict[str, Any]) -> float:
        # Points of mask mAP@0.5 and @0.5:0.95, plus the score drop on a 100-point scale, against fp32.
        p = self.parent
        return ((p["mask_map50"] - row["mask_map50"]) + (p["mask_map50_95"] - row["mask_map50_95"])
                + 100.0 * (p["mean_tp_score"] - row["mean_tp_score"]))

    def figures(self, row: dict[str, Any]) -> str:
        p = self.parent
        return (f"mask mAP@0.5:0.95 {row['mask_map50_95']:.2f} vs fp32 {p['mask_map50_95']:.2f}, mean TP score "
                f"{row['mean_tp_score']:.3f} vs {p['mean_tp_score']:.3f}")
