"""Detector outputs -> boxes, outside the graph: the built-in decoder, NMS, user decoders.

Decoding and NMS stay out of the ONNX graph so that the int8 engine holds only
convolutions, and so that fp32, int8 and TensorRT outputs are judged by the
same numpy code. Every decoder returns, per image, an (M, 6) float32 array
``[x1, y1, x2, y2, score, class]`` in input pixels, best first.

Used by the evaluator (:mod:`edgeslim.components.tasks.detection.evaluate`), the edge pyfunc (decoded detections
instead of raw maps) and the device health check (:func:`match_detections`).
This module imports only numpy (the device agent can use it).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import numpy as np

from edgeslim.components.common.boxes import box_iou, nms  # noqa: F401  (box_iou: re-exported)
from edgeslim.components.common.errors import ConfigError, DataError, SourceError

Decoder = Callable[[list[np.ndarray]], list[np.ndarray]]


def batched_nms(dets: np.ndarray, iou: float, max_detections: int) -> np.ndarray:
    """Class-aware NMS of (M, 6) detections; returns the kept rows, best first."""
    if len(dets) == 0:
        return dets.reshape(0, 6).astype(np.float32)
    keep = nms(dets[:, :4], dets[:, 4], iou, limit=max_detections, classes=dets[:, 5])
    return dets[keep].astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def decode_level(box: np.ndarray, cls: np.ndarray, stride: int, encoding: str, scores: str) -> list[np.ndarray]:
    """One level's maps (N, 4, H, W) and (N, C, H, W) -> per image (H*W, 6) before NMS."""
    n, _, h, w = box.shape
    if scores == "logits":
        cls = _sigmoid(cls)
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    cx, cy = gx + 0.5, gy + 0.5
    b = box.astype(np.float32)
    if encoding == "ltrb":
        d = np.clip(b, 0, None)
        x1, y1, x2, y2 = cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]
    else:
        ccx, ccy = cx + b[:, 0], cy + b[:, 1]
        bw, bh = np.exp(np.clip(b[:, 2], -20, 10)), np.exp(np.clip(b[:, 3], -20, 10))
        x1, y1, x2, y2 = ccx - bw / 2, ccy - bh / 2, ccx + bw / 2, ccy + bh / 2
    xyxy = np.stack([x1, y1, x2, y2], axis=-1) * stride          # (N, H, W, 4)
    score = cls.max(axis=1)                                       # (N, H, W)
    label = cls.argmax(axis=1).astype(np.float32)
    flat = np.concatenate([xyxy, score[..., None], label[..., None]], axis=-1)
    return [flat[i].reshape(-1, 6) for i in range(n)]


def decode_yolo(out: np.ndarray, scores: str) -> list[np.ndarray]:
    """A decoded YOLO output (N, 4+C, A): per anchor cx, cy, w, h in input pixels, then C class
    scores -> per image (A, 6) ``[x1, y1, x2, y2, score, class]`` before NMS (best class per anchor)."""
    out = out.astype(np.float32)
    cls = _sigmoid(out[:, 4:]) if scores == "logits" else out[:, 4:]
    cx, cy, w, h = out[:, 0], out[:, 1], out[:, 2], out[:, 3]
    flat = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cls.max(axis=1),
                     cls.argmax(axis=1).astype(np.float32)], axis=-1)          # (N, A, 6)
    return list(flat)


def _yolo_output(output_names: Sequence[str], dec) -> str:
    return dec.output or (output_names[0] if output_names else "output")


def check_outputs(output_names: Sequence[str], shapes: Sequence[Sequence[Any]], task) -> None:
    """Refuse outputs that do not match the configured heads, naming expected and actual shapes.

    Args:
        output_names: the model's output names, in order.
        shapes: their shapes (from a run on a small batch).
        task: a ``DetectionTaskConfig`` using the built-in decoder.

    Raises:
        ConfigError: a configured output is missing, or a map has the wrong channel count or
            a grid that does not fit the stride.
    """
    dec = task.decoder
    by_name = {n: list(s) for n, s in zip(output_names, shapes)}
    actual = ", ".join(f"{n} {list(s)}" for n, s in by_name.items())
    if dec.format == "yolo-decoded":
        name, want = _yolo_output(output_names, dec), 4 + task.num_classes
        shape = by_name.get(name)
        if shape is None or len(shape) != 3 or shape[1] != want:
            got = "no such output" if shape is None else f"shape {shape}"
            raise ConfigError(
                f"task.decoder (format yolo-decoded): output {name!r} has {got}; expected [N, {want}, A] "
                f"(4 box values + num_classes={task.num_classes} scores per anchor); the model's outputs are: "
                f"{actual}; fix task.num_classes or task.decoder.output, or set task.decode_fn")
        return
    for i, head in enumerate(dec.heads):
        for role, name, channels in (("box", head.box, 4), ("cls", head.cls, task.num_classes)):
            where = f"task.decoder.heads[{i}].{role}"
            if name not in by_name:
                raise ConfigError(
                    f"{where}: the model has no output {name!r}; expected a map [N, {channels}, H, W]; "
                    f"the model's outputs are: {actual}")
            shape = by_name[name]
            if len(shape) != 4 or shape[1] != channels:
                raise ConfigError(
                    f"{where}: output {name!r} has shape {shape}; expected [N, {channels}, H, W] "
                    f"({'4 box values' if role == 'box' else f'num_classes={task.num_classes}'}); "
                    f"the model's outputs are: {actual}")
        b, c = by_name[head.box], by_name[head.cls]
        if b[2:] != c[2:]:
            raise ConfigError(
                f"task.decoder.heads[{i}]: box {head.box!r} grid {b[2:]} differs from cls {head.cls!r} "
                f"grid {c[2:]}; pair the box and class maps of the same level")


def infer_heads(output_names: Sequence[str], shapes: Sequence[Sequence[int]], input_hw: Sequence[int],
                num_classes: int) -> list[dict[str, Any]]:
    """The built-in decoder's ``heads`` for a YOLO-style model, read from its output shapes.

    Outputs are taken in order as (box, cls) pairs of one level: a ``[N, 4, H, W]`` box map
    and a ``[N, num_classes, H, W]`` class map (either order), whose grid divides the input
    into ``stride``-pixel cells. ``edgeslim init`` writes what this finds.

    Raises:
        ConfigError: the outputs are not such pairs; names the shapes and the way out.
    """
    actual = ", ".join(f"{n} {list(s)}" for n, s in zip(output_names, shapes))
    fix = ("write task.decoder.heads by hand, or set task.decode_fn to your own decoder "
           f"(the model's outputs are: {actual})")
    if num_classes == 4:
        raise ConfigError(f"cannot tell box maps from class maps with num_classes=4; {fix}")
    if not shapes or len(shapes) % 2:
        raise ConfigError(f"expected (box, class) output pairs per level, got {len(shapes)} output(s); {fix}")
    heads = []
    for i in range(0, len(shapes), 2):
        (na, a), (nb, b) = (output_names[i], list(shapes[i])), (output_names[i + 1], list(shapes[i + 1]))
        if len(a) != 4 or len(b) != 4 or a[2:] != b[2:] or sorted((a[1], b[1])) != sorted((4, num_classes)):
            raise ConfigError(f"outputs {na} {a} and {nb} {b} are not a [N, 4, H, W] box map and a "
                              f"[N, {num_classes}, H, W] class map of one level; {fix}")
        box, cls = (na, nb) if a[1] == 4 else (nb, na)
        h, w = a[2], a[3]
        if input_hw[0] % h or input_hw[1] % w or input_hw[0] // h != input_hw[1] // w:
            raise ConfigError(f"the {h}x{w} grid of {box} does not divide the {input_hw[0]}x{input_hw[1]} "
                              f"input into square cells; {fix}")
        heads.append({"box": box, "cls": cls, "stride": int(input_hw[0] // h)})
    return heads


def yolo_strides(anchors: int, input_hw: Sequence[int]) -> list[int]:
    """The strides of a decoded YOLO output with ``anchors`` anchors: the first run of doubling strides
    (3 levels from 8 first, as YOLOv5/v8/11 have) whose grids over ``input_hw`` hold that many cells;
    ``[]`` when none does."""
    h, w = int(input_hw[0]), int(input_hw[1])
    for levels in (3, 4, 2, 5, 1):
        for first in (8, 4, 16, 2, 32):
            strides = [first * 2 ** k for k in range(levels)]
            if sum(-(-h // s) * -(-w // s) for s in strides) == anchors:
                return strides
    return []


def infer_decoder(output_names: Sequence[str], shapes: Sequence[Sequence[int]], input_hw: Sequence[int],
                  num_classes: int, model_strides: Sequence[float] = ()) -> dict[str, Any]:
    """The built-in decoder's settings for a model, read from its output shapes.

    - One ``[N, 4+C, A]`` output with ``C >= num_classes`` (Ultralytics' decoded form): format
      ``yolo-decoded``, ``num_classes`` C, strides from ``model_strides`` (e.g. ``model.stride``) when
      their grids hold A anchors, else found from A (:func:`yolo_strides`).
    - (box, cls) map pairs per level: format ``maps`` with the heads of :func:`infer_heads`.

    Returns:
        ``{"format", "num_classes", ...}``: ``output`` and ``strides``, or ``heads``.

    Raises:
        ConfigError: raw per-level maps of a distribution (DFL) head, which the built-in decoder
            cannot decode, or outputs of no known form; one line naming the shapes and the way out.
    """
    shapes = [list(s) for s in shapes]
    if len(shapes) == 1 and len(shapes[0]) == 3 and shapes[0][1] >= 4 + num_classes:
        anchors, h, w = shapes[0][2], int(input_hw[0]), int(input_hw[1])
        given = [int(s) for s in model_strides]
        fits = given and sum(-(-h // s) * -(-w // s) for s in given) == anchors
        return {"format": "yolo-decoded", "num_classes": shapes[0][1] - 4, "output": output_names[0],
                "strides": given if fits else yolo_strides(anchors, input_hw)}
    if len(shapes) == 1 and len(shapes[0]) == 3 and shapes[0][1] > 4:
        raise ConfigError(
            f"output {output_names[0]} {shapes[0]} looks like a decoded YOLO output with {shapes[0][1] - 4} "
            f"classes, but the labels have {num_classes} (classes 0..{num_classes - 1}); check the labels' "
            "class numbers, or set task.decode_fn")
    channels = {s[1] for s in shapes if len(s) == 4}
    if len(shapes) > 1 and len(channels) == 1 and all(len(s) == 4 for s in shapes):
        (c,) = channels
        bins = (c - num_classes) // 4
        if bins > 1 and (c - num_classes) % 4 == 0:
            actual = ", ".join(f"{n} {s}" for n, s in zip(output_names, shapes))
            raise ConfigError(
                f"the model returns raw per-level maps ({actual}: {bins} distribution bins per box side and "
                f"{num_classes} class logits, a DFL head in training mode), which the built-in decoder cannot "
                "decode; register the model in eval/export mode so it returns its decoded (N, 4+classes, A) "
                "output (Ultralytics: model.eval() and model.model[-1].export = True), or set task.decode_fn")
    return {"format": "maps", "num_classes": num_classes,
            "heads": infer_heads(output_names, shapes, input_hw, num_classes)}


def load_user_function(spec: str, key: str) -> Callable:
    """Import a user function ``module:function`` that the recipe's ``key`` names (``task.decode_fn``,
    ``task.loss_fn``).

    Raises:
        ConfigError: the module cannot be imported, it has no such name, or the name is no callable.
    """
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # any import-time failure of user code is the same problem to a user
        raise ConfigError(
            f"{key} {spec!r}: cannot import module {mod_name!r} ({type(exc).__name__}: "
            f"{str(exc)[:120]}); install it or put it on PYTHONPATH") from None
    fn = getattr(mod, fn_name, None)
    if fn is None:
        raise ConfigError(f"{key} {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    if not callable(fn):
        raise ConfigError(f"{key} {spec!r}: {fn_name!r} in module {mod_name!r} is a {type(fn).__name__}, "
                          "not a function; name a function")
    return fn


def load_decode_fn(spec: str) -> Decoder:
    """Import a user decoder ``module:function`` (:func:`load_user_function`)."""
    return load_user_function(spec, "task.decode_fn")


def _check_decoded(result: Any, n_images: int, where: str) -> list[np.ndarray]:
    if not isinstance(result, (list, tuple)) or len(result) != n_images:
        got = f"a {type(result).__name__}" + (f" of length {len(result)}" if hasattr(result, "__len__") else "")
        raise DataError(f"{where} returned {got}; it must return a list with one (M, 6) array per image "
                        f"({n_images} images)")
    out = []
    for i, d in enumerate(result):
        a = np.asarray(d, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != 6:
            raise DataError(f"{where} returned shape {list(a.shape)} for image {i}; each image needs an "
                            "(M, 6) array [x1, y1, x2, y2, score, class]")
        out.append(a)
    return out


def make_decoder(task) -> Decoder:
    """The decoder a ``DetectionTaskConfig`` asks for: ``outputs (list, output order) -> per image (M, 6)``.

    The built-in decoder needs outputs in the model's output order; it looks heads up
    by name, so call it through :func:`decode_outputs` with the names.
    """
    if task.decode_fn:
        fn = load_decode_fn(task.decode_fn)

        def user(outputs: list[np.ndarray], names: Sequence[str] | None = None) -> list[np.ndarray]:
            n = len(outputs[0]) if outputs else 0
            try:
                res = fn(list(outputs))
            except Exception as exc:  # user code: say whose it is
                raise SourceError(f"task.decode_fn {task.decode_fn!r} raised {type(exc).__name__}: "
                                  f"{str(exc)[:160]}") from None
            return _check_decoded(res, n, f"task.decode_fn {task.decode_fn!r}")

        return user

    dec = task.decoder

    def builtin(outputs: list[np.ndarray], names: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(names) if names is not None else [f"output_{i}" for i in range(len(outputs))]
        check_outputs(names, [o.shape for o in outputs], task)
        by_name = dict(zip(names, outputs))
        per_image: list[list[np.ndarray]] = [[] for _ in range(len(outputs[0]))]
        if dec.format == "yolo-decoded":
            for i, d in enumerate(decode_yolo(by_name[_yolo_output(names, dec)], dec.scores)):
                per_image[i].append(d[d[:, 4] >= dec.min_score])
        for head in dec.heads if dec.format == "maps" else ():
            for i, d in enumerate(decode_level(by_name[head.box], by_name[head.cls], head.stride,
                                               dec.box_encoding, dec.scores)):
                per_image[i].append(d[d[:, 4] >= dec.min_score])
        return [batched_nms(np.concatenate(p), dec.nms_iou, dec.max_detections) for p in per_image]

    return builtin


def decode_outputs(outputs: Sequence[np.ndarray] | dict[str, np.ndarray], task,
                   names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Decode a batch of raw outputs to per-image (M, 6) detections.

    Args:
        outputs: the model's outputs: a list in output order (with ``names``), or a dict
            name -> array (what the edge pyfunc and ONNX Runtime give).
        task: the recipe's ``DetectionTaskConfig``.
        names: output names in order, when ``outputs`` is a list (default ``output_0..``).

    Returns:
        Per image an (M, 6) float32 array ``[x1, y1, x2, y2, score, class]``, best first.

    Raises:
        ConfigError: the outputs do not match the configured heads, or the decode
            function cannot be imported.
        DataError: a user decode function returned the wrong shape.
    """
    if isinstance(outputs, dict):
        names = [k for k in outputs if k != "backend"]
        outputs = [np.asarray(outputs[k]) for k in names]
    return make_decoder(task)(list(outputs), names)


def match_detections(golden: np.ndarray, got: np.ndarray, iou: float = 0.9,
                     score_tol: float = 0.05) -> dict[str, Any]:
    """Compare a device's detections on a golden input with the golden ones.

    Each golden box must be found, same class, at IoU >= ``iou`` with a score
    within ``score_tol``; the device may not add boxes of its own above the
    lowest golden score. For the device health check after an install.

    Returns:
        ``{"ok", "matched", "missing", "extra", "max_score_diff", "min_iou", "reason"}``.
    """
    golden = np.asarray(golden, np.float32).reshape(-1, 6)
    got = np.asarray(got, np.float32).reshape(-1, 6)
    used = np.zeros(len(got), bool)
    ious = box_iou(golden[:, :4], got[:, :4]) if len(golden) and len(got) else np.zeros((len(golden), len(got)))
    matched, missing, diffs, min_iou = 0, 0, [], 1.0
    for g in np.argsort(-golden[:, 4], kind="stable"):
        cand = [j for j in np.argsort(-ious[g]) if not used[j] and got[j, 5] == golden[g, 5] and ious[g, j] >= iou]
        if not cand:
            missing += 1
            continue
        j = cand[0]
        used[j] = True
        matched += 1
        diffs.append(abs(float(got[j, 4] - golden[g, 4])))
        min_iou = min(min_iou, float(ious[g, j]))
    floor = float(golden[:, 4].min()) if len(golden) else 0.0
    extra = int(((~used) & (got[:, 4] >= floor)).sum()) if len(got) else 0
    max_diff = max(diffs) if diffs else 0.0
    reasons = []
    if missing:
        reasons.append(f"{missing} of {len(golden)} golden boxes not found at IoU >= {iou}")
    if max_diff > score_tol:
        reasons.append(f"score differs by {max_diff:.3f} (> {score_tol})")
    if extra:
        reasons.append(f"{extra} extra boxes scored >= {floor:.3f}")
    return {"ok": not reasons, "matched": matched, "missing": missing, "extra": extra,
            "max_score_diff": round(max_diff, 4), "min_iou": round(min_iou, 4) if matched else 0.0,
            "reason": "; ".join(reasons) or f"all {matched} golden boxes matched"}


class DetectionRuntime:
    """The detector's runtime half: a prediction adds its decoded boxes, and a release's health check
    records the golden detections, which a device's must match by IoU and score (not raw maps, which
    int8 engines of different builds do not reproduce to the bit)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def predict(self, outputs: dict[str, Any], geometries: list | None = None) -> dict[str, Any]:
        """Per image (M, 6) ``[x1, y1, x2, y2, score, class]``, in source-image pixels when ``geometries`` are given."""
        detections = decode_outputs(outputs, self.config)
        if geometries is not None:
            for dets, g in zip(detections, geometries):
                if len(dets):
                    dets[:, :4] = g.to_source(dets[:, :4])
        return {"detections": detections}

    def golden(self, outputs: dict[str, Any], rollout: Any) -> dict[str, Any]:
        from edgeslim.components.common.arrays import encode_array

        dets = decode_outputs(outputs, self.config)
        return {"detections": [encode_array(np.asarray(d, dtype=np.float32)) for d in dets],
                "iou": rollout.iou, "score_tol": rollout.score_tol}

    def compare(self, check: dict[str, Any], outputs: dict[str, Any]) -> tuple[str | None, float]:
        from edgeslim.components.common.arrays import decode_array

        got = decode_outputs(outputs, self.config)
        worst = 0.0
        for i, blob in enumerate(check.get("detections") or []):
            if i >= len(got):
                return f"golden image {i}: the device returned {len(got)} image(s) of detections", worst
            m = match_detections(decode_array(blob), got[i], iou=float(check.get("iou", 0.9)),
                                 score_tol=float(check.get("score_tol", 0.05)))
            worst = max(worst, m["max_score_diff"])
            if not m["ok"]:
                return f"golden image {i}: detections differ ({m['reason']})", m["max_score_diff"]
        return None, worst
