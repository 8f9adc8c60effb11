"""The segmenter's part of the report: the per-class IoU of fp32 and int8 (from the evaluation), the mask
overlays of fp32 and int8 on a few test images (measured by :func:`figures` in the same pass as the
output error, drawn by :func:`charts`), and the rows of the figures the segmentation gate checks."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.components.common.charts import FP32, INT8, Chart, Svg, bar_panels
from edgeslim.components.common.output_error import OutputError, reference_onnx
from edgeslim.components.common.tasks import fused_kernel_row
from edgeslim.components.tasks.segmentation.evaluate import segment_batches

OVERLAY_IMAGES = 3  # test images the overlay chart shows
THUMB = 112  # the longer side of each overlay panel, in pixels
# Class colours of the overlays (class 0, usually the background, is left uncoloured).
PALETTE = np.array([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                    (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195)], np.float32)


def _grey(x: np.ndarray) -> np.ndarray:
    """A preprocessed input (C, H, W) as an (H, W, 3) picture in 0..255, stretched to its own range."""
    img = x.mean(0) if x.ndim == 3 else x
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(img)
    return np.repeat(img[..., None], 3, axis=2)


def overlay(x: np.ndarray, mask: np.ndarray | None, num_classes: int) -> np.ndarray:
    """The input with each pixel of class >= 1 tinted by its class colour (half and half), uint8."""
    base = _grey(x)
    if mask is not None:
        m = np.asarray(mask)
        colour = PALETTE[np.where((m >= 0) & (m < num_classes), m, 0) % len(PALETTE)]
        tint = (m > 0) & (m < num_classes)
        base = np.where(tint[..., None], 0.5 * base + 0.5 * colour, base)
    return base.clip(0, 255).astype(np.uint8)


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    scale = THUMB / max(im.size)
    if scale != 1.0:
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _instance_map(decoded: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """An image's instances scored at least ``threshold`` as one class map (class + 1; the best on top)."""
    dets, masks = decoded["detections"], decoded["masks"]
    out = np.zeros(masks.shape[1:], np.int32)
    for d, m in list(zip(dets, masks))[::-1]:
        if d[4] >= threshold:
            out[m] = int(d[5]) + 1
    return out


def _label_map(label: np.ndarray) -> np.ndarray:
    lab = np.asarray(label)
    return lab.max(0).astype(np.int32) if len(lab) else np.zeros(lab.shape[1:], np.int32)


def instance_figures(candidate_onnx, *, parent_onnx, data, task, student_onnx=None) -> dict[str, Any]:
    """``yolo-seg``: the output error and the overlays of the instances scored at the deployment threshold."""
    from edgeslim.components.tasks.segmentation.instance_eval import instance_batches

    ref_path, reference = reference_onnx(parent_onnx=parent_onnx, student_onnx=student_onnx)
    own = ref_path != Path(parent_onnx)
    err, shown = OutputError(), []
    x = np.asarray(data.x_test[:OVERLAY_IMAGES])
    k, thr = task.num_classes + 1, task.score_threshold

    def on_batch(raw, decoded, labels):
        err.add(raw[2 if own else 0], raw[1])
        for i in range(min(len(labels), OVERLAY_IMAGES - len(shown))):
            fp32, int8 = _instance_map(decoded[0][i], thr), _instance_map(decoded[1][i], thr)
            xi = x[len(shown)]
            shown.append({"input": _png(overlay(xi, None, k)), "labels": _png(overlay(xi, _label_map(labels[i]), k)),
                          "fp32": _png(overlay(xi, fp32, k)), "int8": _png(overlay(xi, int8, k)),
                          "pixel_agreement": round(float((fp32 == int8).mean()), 5)})

    paths = [parent_onnx, candidate_onnx, *([student_onnx] if own else [])]
    instance_batches(paths, data.x_test, data.y_test, task, on_batch=on_batch)
    return {"output_error": err.result(reference), "overlays": shown}


def figures(candidate_onnx: str | Path, *, parent_onnx: str | Path, data, task,
            student_onnx: str | Path | None = None) -> dict[str, Any]:
    """The int8 output error against its own fp32 model, and the overlays (input, labels, fp32, int8 masks as
    PNGs) of the first test images, in one pass of the models over the test split."""
    if task.instance:
        return instance_figures(candidate_onnx, parent_onnx=parent_onnx, data=data, task=task,
                                student_onnx=student_onnx)
    ref_path, reference = reference_onnx(parent_onnx=parent_onnx, student_onnx=student_onnx)
    own = ref_path != Path(parent_onnx)
    err = OutputError()
    paths = [parent_onnx, candidate_onnx, *([student_onnx] if own else [])]
    ref = 2 if own else 0
    shown: list[dict[str, Any]] = []
    x = np.asarray(data.x_test[:OVERLAY_IMAGES])

    def on_batch(raw, masks, labels):
        err.add(raw[ref], raw[1])
        for i in range(min(len(labels), OVERLAY_IMAGES - len(shown))):
            k = task.num_classes
            fp32, int8 = masks[0][i], masks[1][i]
            shown.append({"input": _png(overlay(x[len(shown)], None, k)),
                          "labels": _png(overlay(x[len(shown)], labels[i], k)),
                          "fp32": _png(overlay(x[len(shown)], fp32, k)), "int8": _png(overlay(x[len(shown)], int8, k)),
                          "pixel_agreement": round(float((fp32 == int8).mean()), 5)})

    segment_batches(paths, data.x_test, data.y_test, task, on_batch=on_batch)
    return {"output_error": err.result(reference), "overlays": shown}


def iou_chart(rep: dict[str, Any]) -> Chart:
    si, ci = (rep[k].get("instance_segmentation") or {} for k in ("source", "candidate"))
    if si and ci:
        title = "Per-class mask AP@0.5, fp32 and int8"
        rows_ = [{"class": f"class {k}", "fp32": v, "int8": ci["per_class_mask_ap50"].get(k, 0.0)}
                 for k, v in si["per_class_mask_ap50"].items()]
        svg = bar_panels(title, rows_, "class", [("fp32 mask AP@0.5 (%)", "fp32", FP32, None),
                                                 ("int8 mask AP@0.5 (%)", "int8", INT8, None)])
        return Chart("segmentation-iou", title, svg, f"Test split, {si['instances']} instances; mask mAP@0.5:0.95 "
                     f"{si['mask_map50_95']:.2f} (fp32), {ci['mask_map50_95']:.2f} (int8).")
    title = "Per-class IoU, fp32 and int8"
    s, c = (rep[k].get("segmentation") or {} for k in ("source", "candidate"))
    if not s or not c:
        return Chart("segmentation-iou", title, None, "Per-class IoU: not recorded by the evaluate task.")
    rows_ = [{"class": f"class {k}", "fp32": v, "int8": c["per_class_iou"].get(k, 0.0)}
             for k, v in s["per_class_iou"].items()]
    svg = bar_panels(title, rows_, "class", [("fp32 IoU (%)", "fp32", FP32, None), ("int8 IoU (%)", "int8", INT8, None)])
    return Chart("segmentation-iou", title, svg, f"Test split, {len(rows_)} class(es); mIoU {s['miou']:.2f} (fp32), "
                 f"{c['miou']:.2f} (int8).")


def overlay_chart(rep: dict[str, Any]) -> Chart:
    title = "Masks on test images: labels, fp32 and int8"
    shown = (rep.get("figures") or {}).get("overlays")
    if not shown:
        return Chart("segmentation-overlay", title, None, "Mask overlays: not recorded by the evaluate task.")
    cols = ("input", "labels", "fp32", "int8")
    gap, top = 8, 48
    svg = Svg(20 + len(cols) * (THUMB + gap), top + len(shown) * (THUMB + 24) + 10, title)
    svg.text(12, 20, title, size=14, weight="bold")
    for j, name in enumerate(cols):
        svg.text(20 + j * (THUMB + gap) + THUMB / 2, top - 8, name, size=11, anchor="middle")
    for i, row in enumerate(shown):
        y = top + i * (THUMB + 24)
        for j, name in enumerate(cols):
            x = 20 + j * (THUMB + gap)
            svg.parts.append(f'<image x="{x}" y="{y}" width="{THUMB}" height="{THUMB}" '
                             f'preserveAspectRatio="xMidYMid meet" style="image-rendering:pixelated" '
                             f'href="data:image/png;base64,{row[name]}"/>')
        svg.text(20, y + THUMB + 14, f"test image {i}: fp32 and int8 masks agree on {100 * row['pixel_agreement']:.1f}% "
                 "of pixels", size=10)
    return Chart("segmentation-overlay", title, svg.render(),
                 "Each class above 0 tinted in its colour over the input (class 0 uncoloured); the first test images.")


def charts(rep: dict[str, Any]) -> list[Chart]:
    return [iou_chart(rep), overlay_chart(rep)]


def instance_rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``yolo-seg``: box and mask mAP, the score calibration and the agreement figures."""
    cand = rep["candidate"]
    s, c = rep["source"].get("instance_segmentation") or {}, cand.get("instance_segmentation") or {}
    if not s or not c:
        return []
    thr = c.get("score_threshold", 0.25)
    out = [(label, f"{s[k]:.2f}", f"{c[k]:.2f}", f"{c[k] - s[k]:+.2f} pt") for label, k in (
        ("mask mAP@0.5 (%)", "mask_map50"), ("box mAP@0.5 (%)", "box_map50"), ("box mAP@0.5:0.95 (%)", "box_map50_95"),
        (f"recall at score >= {thr:g} (%)", "recall"), (f"precision at score >= {thr:g} (%)", "precision"))]
    out.insert(1, ("mean true-positive score", f"{s['mean_tp_score']:.3f}", f"{c['mean_tp_score']:.3f}",
                   f"{c['mean_tp_score'] - s['mean_tp_score']:+.3f}"))
    out.append(("instance agreement", "", f"{cand['fidelity'].get('mask_agreement', 0.0):.4f}", ""))
    return out + fused_kernel_row(cand, "mask mAP@0.5:0.95", rep.get("test_samples"))


def rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Pixel accuracy, the worst class's IoU and the agreement figures the segmentation gate's reader wants."""
    if rep["source"].get("instance_segmentation"):
        return instance_rows(rep)
    cand = rep["candidate"]
    s, c = rep["source"].get("segmentation") or {}, cand.get("segmentation") or {}
    if not s or not c:
        return []
    fid = cand.get("fidelity") or {}
    out = [("pixel accuracy (%)", f"{s['pixel_accuracy']:.2f}", f"{c['pixel_accuracy']:.2f}",
            f"{c['pixel_accuracy'] - s['pixel_accuracy']:+.2f} pt"),
           (f"worst class IoU (%), class {c.get('worst_class')}",
            f"{s['per_class_iou'].get(str(c.get('worst_class')), 0.0):.2f}", f"{c['worst_class_iou']:.2f}",
            f"{c['worst_class_iou'] - s['per_class_iou'].get(str(c.get('worst_class')), 0.0):+.2f} pt")]
    out += [(f"IoU class {k} (%)", f"{v:.2f}", f"{c['per_class_iou'].get(k, 0.0):.2f}",
             f"{c['per_class_iou'].get(k, 0.0) - v:+.2f} pt") for k, v in s["per_class_iou"].items()]
    out += [("pixel agreement with the parent", "", f"{fid.get('pixel_agreement', 0.0):.4f}", ""),
            ("logits SQNR (dB)", "", f"{fid.get('sqnr_db', 0.0):.2f}", "")]
    return out + fused_kernel_row(cand, "mIoU", rep.get("test_samples"))
