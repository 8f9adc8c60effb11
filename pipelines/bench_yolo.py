"""``edgeslim bench --workload yolov8n``: an Ultralytics YOLOv8n at 640x640 through int8, a workload of
the one bench harness (:mod:`.bench_harness`), and what the accuracy-aware search costs on it.

Nothing can be downloaded here, so the network is ``YOLO("yolov8n.yaml").model`` with random weights
(BatchNorm statistics taken from the training canvases, as training would leave them). Its costs
(wall time and peak RSS of every stage, size, latency) are the real network's; its accuracy is not.
The canvases are synthetic 640x480 scenes (a smooth background with filled boxes of random colours),
letterboxed to 640x640 as Ultralytics does. A random network finds none of those boxes, so the boxes
every split is scored against are the fp32 network's own best detections on it: mAP then says how far
an int8 model's detections moved from fp32's (100 is "the same boxes"), not how good a detector it is.
Output SQNR against fp32 is reported beside it.

Rows: fp32; edgeslim PTQ per calibrator; the accuracy-aware search (``quantize: auto``: PTQ, then the
output tail and the most sensitive layers kept in float, judged on the validation split). QAT is left
out: at 640 pixels it trains for tens of minutes on 2 cores, which is what this bench is meant not to
take.

The search's cost is reported as a ratio to one evaluation pass over the validation split (fp32 ONNX
inference, decoding and mAP): the target is at most 10x, whatever the number of layers.

``edgeslim bench --workload yolov8n-trained`` (:class:`YoloV8nTrained`) measures accuracy instead: the same
network with 3 classes, trained here with edgeslim's ``train_detector`` (Ultralytics' v8DetectionLoss) on
synthetic scenes of filled shapes at 192 pixels (640 is not affordable to train on 2 CPU cores), then ModelOpt
(Ultralytics' settings, on Ultralytics' own export), per calibrator plain PTQ and ``quantize: auto`` with that
calibrator alone, and ``quantize: auto`` over all four (``select: first`` and ``best``, and with bias correction),
against the detector gate of the YOLOv8n recipe (0.3 pt mAP@0.5, 1.0 pt mAP@0.5:0.95), chosen on val and scored
on test against the drawn boxes, each drop with its 95% paired-bootstrap interval; the target is mAP@0.5 within
0.05 pt of fp32 and mAP@0.5:0.95 not below it, at most 60% of ModelOpt's bytes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeslim.components.common.errors import MissingDependencyError
from edgeslim.pipelines.bench_harness import Column, Context, RowSpec, Workload
from edgeslim.pipelines.bench_peers import ULTRALYTICS_ROW

SIZE = 640
SEARCH_COST_TARGET = 10.0  # the search at most 10x one evaluation pass over val
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
LABELS_PER_IMAGE = 3  # the fp32 network's best boxes, this many per image on average: what every split is scored against


def canvases(n: int, seed: int, width: int = SIZE, height: int = SIZE * 3 // 4) -> list[np.ndarray]:
    """``n`` synthetic (height, width, 3) uint8 scenes: a smooth colour gradient with noise and two to
    five filled boxes of random colours and sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    out = []
    for _ in range(n):
        f = rng.uniform(1, 4, 3)
        img = np.stack([np.sin(6.28 * (xx * f[k] + yy * f[(k + 1) % 3]) + k) for k in range(3)], -1) * 60 + 110
        img += rng.normal(0, 8, img.shape)
        for _ in range(rng.integers(2, 6)):
            w, h = rng.integers(width // 12, width // 3), rng.integers(height // 12, height // 3)
            x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
            img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, 3)
        out.append(img.clip(0, 255).astype(np.uint8))
    return out


def letterboxed(images: list[np.ndarray]) -> np.ndarray:
    """The images as YOLOv8n inputs: letterboxed to 640x640 (grey padding), 0-1, NCHW."""
    from edgeslim.components.common.image_preprocess import ImagePreprocessConfig, images_to_inputs

    x, _ = images_to_inputs(images, ImagePreprocessConfig(letterbox=SIZE))
    return x


def yolov8n(seed: int, x_stats: np.ndarray):
    """``YOLO("yolov8n.yaml").model`` with random weights (80 classes) in eval mode, its BatchNorm
    statistics averaged over ``x_stats`` (a few images at a time)."""
    import torch

    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics import YOLO
    except ImportError:
        raise MissingDependencyError("ultralytics", why="the yolov8n bench builds its network with it") from None
    torch.manual_seed(seed)
    model = YOLO("yolov8n.yaml").model
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over every batch
    model.train()
    with torch.no_grad():
        for i in range(0, len(x_stats), 4):
            model(torch.from_numpy(x_stats[i:i + 4]))
    return model.eval()


def calibration_cost(samples=(8, 32), repeats: int = 3, seed: int = 0, workdir: str | Path | None = None) -> list[dict]:
    """What calibrating this YOLOv8n at 640 costs against one plain ONNX Runtime pass over the same images
    (held in memory, random pixels: cost only), per calibrator: medians of ``repeats`` runs taking turns.
    Run: ``python -c "from edgeslim.pipelines.bench_yolo import calibration_cost; print(calibration_cost())"``."""
    import statistics
    import tempfile

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.onnx_runtime import make_session, run_batched
    from edgeslim.components.common.stage_configs import OnnxExportConfig, PTQQuantizeConfig
    from edgeslim.components.export import export
    from edgeslim.components.quantize.ptq import calibrate_onnx

    stats = letterboxed(canvases(8, seed))
    with tempfile.TemporaryDirectory(prefix="edgeslim-yolo-calib-") as tmp:
        d = Splits(stats, np.zeros(8), stats[:2], np.zeros(2), stats[:2], np.zeros(2), source="canvases")
        onnx_path = str(export(yolov8n(seed, stats), OnnxExportConfig(check_samples=1, atol=0.5),
                               out_path=Path(workdir or tmp) / "yolov8n.onnx", data=d).model)
        sess, rows = make_session(onnx_path), []
        for n in samples:
            x = np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)
            data = Splits(x, np.zeros(n), x[:2], np.zeros(2), x[:2], np.zeros(2), source="random pixels")
            times: dict[str, list[float]] = {"entropy": [], "minmax": [], "plain": []}
            for _ in range(repeats):
                for cal in ("entropy", "minmax"):
                    t = time.perf_counter()
                    calibrate_onnx(onnx_path, PTQQuantizeConfig(calibrator=cal, num_samples=n), data)
                    times[cal].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    run_batched(sess, x, batch=8)
                    times["plain"].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"samples": n, **{f"{k}_s": round(v, 2) for k, v in med.items()},
                         **{f"{k}_x_plain": round(med[k] / med["plain"], 2) for k in ("entropy", "minmax")}})
    return rows


def task_config():
    """The detection task of a YOLOv8n with random weights: Ultralytics' decoded output, and score
    thresholds low enough for the scores such a network gives (about 1e-4)."""
    from edgeslim.components.tasks.detection.config import DetectionTaskConfig

    return DetectionTaskConfig.from_dict({
        "kind": "detection", "num_classes": 80, "score_threshold": 0.0002,
        "decoder": {"format": "yolo-decoded", "strides": [8, 16, 32], "min_score": 0.0001, "nms_iou": 0.5,
                    "max_detections": 100}}, prefix="task")


def own_boxes(fp32_onnx: Path, x, task) -> np.ndarray:
    """The fp32 network's best ``LABELS_PER_IMAGE * len(x)`` boxes over all of ``x`` as per-image
    ``[x1, y1, x2, y2, class]`` labels: one score cut for every image, so fp32 scores mAP 100."""
    from edgeslim.components.tasks.detection.evaluate import onnx_detections

    dets, _, _ = onnx_detections(fp32_onnx, x, task, keep_outputs=False)
    scores = np.sort(np.concatenate([d[:, 4] for d in dets]))[::-1]
    cut = scores[min(LABELS_PER_IMAGE * len(dets), len(scores)) - 1] if len(scores) else np.inf
    y = np.empty(len(dets), dtype=object)
    y[:] = [d[d[:, 4] >= cut][:, [0, 1, 2, 3, 5]].astype(np.float32) for d in dets]
    return y


def evaluation_pass(fp32_onnx: Path, x, y, task) -> float:
    """Seconds of one evaluation pass: fp32 ONNX Runtime inference, decoding and mAP over ``x``."""
    from edgeslim.components.tasks.detection.evaluate import detection_metrics, onnx_detections

    t = time.perf_counter()
    dets, _, _ = onnx_detections(fp32_onnx, x, task, keep_outputs=False)
    detection_metrics(dets, list(y), task.num_classes, task.score_threshold)
    return time.perf_counter() - t


class YoloV8n(Workload):
    """Ultralytics YOLOv8n at 640 with random weights: fp32, PTQ per calibrator, the accuracy-aware search."""

    name = "yolov8n"
    columns = (Column("sqnr_db", "SQNR dB", 7, ".1f"), Column("map50", "mAP50*", 7, ".2f"),
               Column("map50_95", "mAP50-95*", 9, ".2f"), Column("recall", "R@thr*", 6, ".1f"))
    drops = {"map50_drop": ("map50", 3)}
    latency_batches = (1,)  # batch 32 at 640 pixels: minutes per row on 2 cores

    def __init__(self, *, n_train: int = 16, n_val: int = 32, n_test: int = 32, calib_samples: int = 16) -> None:
        self.n_train, self.n_val, self.n_test, self.calib_samples = n_train, n_val, n_test, calib_samples

    def prepare(self, ctx: Context) -> None:
        from edgeslim.components.common.data import Splits
        from edgeslim.components.common.stage_configs import OnnxExportConfig
        from edgeslim.components.export import export

        if ctx.quick:  # a smoke run: figures mean nothing
            self.n_train, self.n_val, self.n_test, self.calib_samples = 4, 4, 4, 4
        n = self.n_train + self.n_val + self.n_test
        ctx.log(f"YOLOv8n, random weights, {n} synthetic canvases letterboxed to {SIZE}x{SIZE}")
        x = letterboxed(canvases(n, ctx.seed))
        ctx.teacher = yolov8n(ctx.seed, x[:self.n_train])
        task = ctx.extra["task"] = task_config()
        nolabels = np.empty(n, dtype=object)
        nolabels[:] = [np.zeros((0, 5), np.float32)] * n
        a, b = self.n_train, self.n_train + self.n_val
        # atol 0.1: the boxes are in 640-pixel units (torch and ORT differ by ~0.02 px)
        fp32 = export(ctx.teacher, OnnxExportConfig(check_samples=2, atol=0.1), out_path=ctx.workdir / "yolov8n.fp32.onnx",
                      data=Splits(x[:a], nolabels[:a], x[a:b], nolabels[a:b], x[b:], nolabels[b:])).model
        y = own_boxes(Path(fp32), x, task)
        ctx.extra["fp32"] = Path(fp32)
        ctx.data = Splits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], source=f"synthetic canvases at {SIZE}")

    def rows(self, ctx: Context) -> Iterator[RowSpec]:
        import torch

        from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, PTQQuantizeConfig
        from edgeslim.components.quantize.ptq import quantize
        from edgeslim.components.transform.prune import count_macs_params

        data, task, wd, log, fp32 = ctx.data, ctx.extra["task"], ctx.workdir, ctx.log, ctx.extra["fp32"]
        macs = count_macs_params(ctx.teacher, torch.from_numpy(data.x_test[:1]))[0]
        yield RowSpec("fp32", fp32, macs)
        for cal in CALIBRATORS[:1] if ctx.quick else CALIBRATORS:
            log(f"PTQ {cal}")
            res = quantize(fp32, PTQQuantizeConfig(calibrator=cal, num_samples=self.calib_samples),
                           data=data, out_dir=wd / f"ptq-{cal}")
            yield RowSpec(f"edgeslim PTQ {cal}", Path(res.model), macs, int8=True)
        log("one evaluation pass over val, to compare the searches' cost with")
        eval_s = evaluation_pass(fp32, data.x_val, data.y_val, task)
        # placement weighted: what `edgeslim init` writes for a detector; auto: the default (all, then weighted)
        for place in ("weighted",) if ctx.quick else ("weighted", "auto"):
            cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=self.calib_samples,
                                              max_float_layers=3, qat=False, placement=place)
            log(f"accuracy-aware search, placement {place} (judged on val)")
            yield self._search_row(ctx, cfg, f"edgeslim search (minmax, {place})", wd / f"auto-{place}", data,
                                   eval_s, macs)

    def _search_row(self, ctx: Context, cfg, name: str, out: Path, data, eval_s: float, macs: int) -> RowSpec:
        """``quantize: auto`` with ``cfg``, judged on ``data``'s val, as a row: the winner, or why no trial
        passed, and what the search cost against one evaluation pass (``eval_s``)."""
        from edgeslim.components.common.errors import GateRejected
        from edgeslim.components.tasks.detection.search import quantize_detector_auto

        t = time.perf_counter()
        try:
            res = quantize_detector_auto(ctx.extra["fp32"], cfg, data=data, task=ctx.extra["task"], out_dir=out,
                                         progress=lambda m: ctx.log("    " + m))
        except GateRejected as exc:  # no trial passed on val: the row says why
            return RowSpec(name, None, failed=" ".join(str(exc).split())[:300],
                           extra=self._cost(time.perf_counter() - t, eval_s, out / "autotune.json", data))
        cost = self._cost(time.perf_counter() - t, eval_s, out / "autotune.json", data)
        return RowSpec(name, Path(res.model), macs, int8=True, extra={
            "winner": res.metrics.get("winner"), "float_layers": res.metrics["float_layers"],
            "search": res.metrics["reason"], **cost})

    def _cost(self, search_s: float, eval_s: float, autotune: Path, data) -> dict[str, Any]:
        import json

        report = json.loads(autotune.read_text()) if autotune.is_file() else {}
        return {"search_s": round(search_s, 1), "eval_pass_s": round(eval_s, 2), "val_images": len(data.x_val),
                "search_cost_ratio": round(search_s / max(eval_s, 1e-9), 1),
                "trials": len(report.get("trials", [])), "search_cost": report.get("cost")}

    def accuracy(self, ctx: Context, spec: RowSpec, reference):
        from edgeslim.components.common.onnx_runtime import SqnrAccumulator
        from edgeslim.components.tasks.detection.evaluate import detection_metrics, onnx_detections

        task = ctx.extra["task"]
        dets, outs, _ = onnx_detections(spec.path, ctx.data.x_test, task)
        m = detection_metrics(dets, list(ctx.data.y_test), task.num_classes, task.score_threshold)
        row = {k: m[k] for k in ("map50", "map50_95", "recall")}
        if reference is None:
            return {**row, "sqnr_db": None}, outs
        acc = SqnrAccumulator()
        for r, c in zip(reference, outs):
            acc.add(r, c)
        return {**row, "sqnr_db": round(acc.db(), 2)}, None

    def targets(self, rows, ctx):
        auto = [r for r in rows if "search_cost_ratio" in r]
        return {f"search cost <= {SEARCH_COST_TARGET:g}x one evaluation pass over val": {
            "value": r["search_cost_ratio"], "met": r["search_cost_ratio"] <= SEARCH_COST_TARGET} for r in auto}

    def summary(self, ctx):
        d = ctx.data
        return {"input": [3, SIZE, SIZE], "train_images": len(d.x_train), "val_images": len(d.x_val),
                "test_images": len(d.x_test), "calib_samples": self.calib_samples,
                "note": "random weights: costs are real, accuracy figures are not (scored against the fp32 "
                        "network's own boxes)"}

    def notes(self, result):
        lines = [f"YOLOv8n, RANDOM weights (nothing can be downloaded here): costs are real, accuracy is not. "
                 f"* mAP/recall are against the fp32 network's own best boxes ({LABELS_PER_IMAGE} per image on average, "
                 f"{result['test_images']} test canvases): they say how far int8 moved the detections, not "
                 f"how good a detector it is; SQNR is the raw output against fp32."]
        for r in result["rows"]:
            if "search_cost_ratio" in r:
                lines.append(f"  {r['row']}: search {r['search_s']:.1f} s = {r['search_cost_ratio']:.1f}x one "
                             f"evaluation pass over val ({r['val_images']} images, {r['eval_pass_s']:.2f} s), "
                             f"{r['trials']} trial(s); target <= {SEARCH_COST_TARGET:g}x")
                if r.get("search_cost"):
                    lines.append("    where it went (s): " + ", ".join(
                        f"{k[:-2]} {v:.1f}" for k, v in r["search_cost"].items()))
            if r.get("search"):
                lines.append(f"    {r['search']}")
        return lines


# ---------------------------------------------------------------------------------------------------------
# ``edgeslim bench --workload yolov8n-trained``: the accuracy target on a YOLOv8n trained here.

TARGET_MAP50_DROP = 0.05  # the accuracy target on test: mAP@0.5 within this many points of fp32,
TARGET_BYTES_SHARE = 0.6  # mAP@0.5:0.95 not below fp32's, at most this share of ModelOpt's bytes
TRAINED_SIZE = 192  # 640 cannot be trained on 2 shared CPU cores; 192 is a multiple of the largest stride
SHAPES = ("disc", "square", "triangle")  # the classes: filled shapes, learnable from scratch in minutes


def shape_scenes(n: int, seed: int, size: int = TRAINED_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic (3, size, size) 0-1 scenes: a smooth noisy background with one to three filled
    shapes (class = ``SHAPES`` index) of random colour, size (1/6 to 1/2 of the side) and position, and per
    scene its float32 ``(k, 5)`` labels ``[x1, y1, x2, y2, class]`` in input pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x = np.empty((n, 3, size, size), np.float32)
    y = np.empty(n, dtype=object)
    for i in range(n):
        f = rng.uniform(0.5, 2, 3)
        img = np.stack([np.sin(6.28 * (xx * f[k] + yy * f[(k + 1) % 3]) / size + k) for k in range(3)]) * 0.2 + 0.45
        img += rng.normal(0, 0.03, img.shape)
        boxes = []
        for _ in range(rng.integers(1, 4)):
            s = int(rng.integers(size // 6, size // 2))
            x0, y0, c = int(rng.integers(0, size - s)), int(rng.integers(0, size - s)), int(rng.integers(len(SHAPES)))
            u, v = (xx - x0) / s, (yy - y0) / s  # 0-1 inside the shape's box
            inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
            mask = [inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25), inside,
                    inside & (np.abs(u - 0.5) * 2 <= v)][c]
            img[:, mask] = rng.uniform(0, 1, (3, 1))
            boxes.append([x0, y0, x0 + s, y0 + s, c])
        x[i] = img.clip(0, 1)
        y[i] = np.array(boxes, np.float32).reshape(-1, 5)
    return x, y


def trained_task_config():
    """The detection task of the trained YOLOv8n: Ultralytics' decoded output, its validation's low
    ``min_score`` for mAP, and the target's gate (0.3 pt mAP@0.5, 1.0 pt mAP@0.5:0.95)."""
    from edgeslim.components.tasks.detection.config import DetectionTaskConfig

    return DetectionTaskConfig.from_dict({
        "kind": "detection", "num_classes": len(SHAPES), "score_threshold": 0.25,
        "decoder": {"format": "yolo-decoded", "strides": [8, 16, 32], "min_score": 0.001, "nms_iou": 0.6,
                    "max_detections": 100},
        "gate": {"max_map_drop": 0.3, "max_map50_95_drop": 1.0}}, prefix="task")


class YoloV8nTrained(YoloV8n):
    """YOLOv8n (``nc`` = 3) trained here on shape scenes at 192 pixels with edgeslim's ``train_detector``
    (Ultralytics' own v8DetectionLoss), then ModelOpt, per calibrator plain PTQ and ``quantize: auto`` with
    that one calibrator, and ``quantize: auto`` over all of them (judged on val, QAT off), all scored on the
    test split against the drawn boxes."""

    name = "yolov8n-trained"
    columns = (Column("sqnr_db", "SQNR dB", 7, ".1f"), Column("map50", "mAP50", 6, ".2f"),
               Column("map50_95", "mAP50-95", 8, ".2f"), Column("recall", "R@0.25", 6, ".1f"))
    drops = {"map50_drop": ("map50", 3), "map50_95_drop": ("map50_95", 3)}

    def __init__(self, *, n_train: int = 288, n_val: int = 128, n_test: int = 768, calib_samples: int = 64,
                 epochs: int = 12, batch_size: int = 8, lr: float = 3e-3) -> None:
        super().__init__(n_train=n_train, n_val=n_val, n_test=n_test, calib_samples=calib_samples)
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr

    def prepare(self, ctx: Context) -> None:
        import torch

        from edgeslim.components.common.data import Splits
        from edgeslim.components.common.stage_configs import OnnxExportConfig
        from edgeslim.components.export import export
        from edgeslim.components.tasks.detection.train import train_detector

        if ctx.quick:  # a smoke run: two optimizer steps, figures mean nothing
            self.n_train, self.n_val, self.n_test, self.calib_samples, self.epochs = 4, 4, 4, 4, 1
            self.batch_size = 2
        n = self.n_train + self.n_val + self.n_test
        x, y = shape_scenes(n, ctx.seed)
        a, b = self.n_train, self.n_train + self.n_val
        os.environ.setdefault("YOLO_OFFLINE", "1")
        try:
            from ultralytics.nn.tasks import DetectionModel
        except ImportError:
            raise MissingDependencyError("ultralytics", why="the yolov8n-trained bench builds its network with it") from None
        torch.manual_seed(ctx.seed)
        model = DetectionModel("yolov8n.yaml", nc=len(SHAPES), verbose=False)  # YOLO("yolov8n.yaml").model's class
        ctx.log(f"YOLOv8n (nc={len(SHAPES)}), {n} shape scenes at {TRAINED_SIZE}x{TRAINED_SIZE} "
                f"({self.n_train}/{self.n_val}/{self.n_test}); training {self.epochs} epochs, batch {self.batch_size}")
        task = ctx.extra["task"] = trained_task_config()
        # The trained weights are kept in the workdir, named by what decides them: a run with the same
        # --workdir and settings measures the same network without training it again.
        ckpt = ctx.workdir / (f"yolov8n-trained-seed{ctx.seed}-n{self.n_train}-e{self.epochs}-b{self.batch_size}"
                              f"-lr{self.lr:g}.pt")
        if ckpt.is_file():
            saved = torch.load(ckpt, weights_only=True)
            model.load_state_dict(saved["state_dict"])
            ctx.extra["train_s"] = float(saved["train_s"])
            ctx.log(f"  trained weights from {ckpt} (trained in {saved['train_s']:.0f} s)")
        else:
            t = time.perf_counter()
            train_detector(model, x[:a], list(y[:a]), epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           seed=ctx.seed, task=task,
                           progress=lambda e, n_e, loss: ctx.log(f"  epoch {e}/{n_e} loss {loss:.3f} "
                                                                  f"({time.perf_counter() - t:.0f} s)"))
            ctx.extra["train_s"] = round(time.perf_counter() - t, 1)
            torch.save({"state_dict": model.state_dict(), "train_s": ctx.extra["train_s"]}, ckpt)
        ctx.teacher = model.eval()
        ctx.data = Splits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], source=f"shape scenes at {TRAINED_SIZE}")
        fp32 = export(ctx.teacher, OnnxExportConfig(check_samples=2, atol=0.1),
                      out_path=ctx.workdir / "yolov8n-trained.fp32.onnx", data=ctx.data).model
        ctx.extra["fp32"] = Path(fp32)

    def rows(self, ctx: Context) -> Iterator[RowSpec]:
        import torch

        from edgeslim.components.common.stage_configs import PTQQuantizeConfig
        from edgeslim.components.quantize.ptq import quantize
        from edgeslim.components.transform.prune import count_macs_params
        from edgeslim.pipelines.bench_peers import modelopt_row, modelopt_ultralytics_row

        data, task, wd, log, fp32 = ctx.data, ctx.extra["task"], ctx.workdir, ctx.log, ctx.extra["fp32"]
        macs = count_macs_params(ctx.teacher, torch.from_numpy(data.x_test[:1]))[0]
        yield RowSpec("fp32", fp32, macs)
        # The hand-tuned peer as a YOLOv8 user runs it: Ultralytics' own ONNX export, ModelOpt with Ultralytics'
        # TensorRT settings (the head excluded by node name, max calibration, up to 512 images); scored with
        # edgeslim's evaluator on the same test split as edgeslim's rows, which quantize edgeslim's own export.
        log("NVIDIA ModelOpt ONNX int8 with Ultralytics' settings, on Ultralytics' own export")
        yield modelopt_ultralytics_row(ctx.teacher, TRAINED_SIZE, data, wd / "ultralytics", macs)
        # ModelOpt on edgeslim's export, the output tails (found from the graph) excluded
        log("NVIDIA ModelOpt ONNX int8 (max calibration, output tails float)")
        yield modelopt_row(fp32, data, wd / "modelopt.onnx", self.calib_samples, macs)
        eval_s = evaluation_pass(fp32, data.x_val, data.y_val, task)
        cals = list(CALIBRATORS[:1 if ctx.quick else None])
        for cal in cals:
            log(f"PTQ {cal}, weighted")  # every weighted layer int8: what the search starts from
            res = quantize(fp32, PTQQuantizeConfig(calibrator=cal, num_samples=self.calib_samples, placement="weighted"),
                           data=data, out_dir=wd / f"ptq-{cal}-weighted")
            yield RowSpec(f"PTQ {cal}, weighted", Path(res.model), macs, int8=True)
            yield self._search(ctx, [cal], data, eval_s, macs)
        if len(cals) > 1:  # the recipe's calibrators: the first trial to pass (the default), then the best on val
            yield self._search(ctx, cals, data, eval_s, macs, select="first")
            yield self._search(ctx, cals, data, eval_s, macs)
            yield self._search(ctx, cals, data, eval_s, macs, bias_correction=True)

    def _search(self, ctx: Context, cals: list[str], data, eval_s: float, macs: int, *,
                select: str = "best", bias_correction: bool = False) -> RowSpec:
        from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig

        # the recipe's defaults (placement auto, max_float_layers 3) but the calibrators, QAT off, and
        # select: best (every PTQ trial judged on val, the passing one with the most mAP kept wins) unless
        # select says "first" (the default: the first trial to pass)
        cfg = AccuracyAwareQuantizeConfig(calibrators=cals, num_samples=self.calib_samples, qat=False, select=select,
                                          bias_correction=bias_correction)
        tag = ((cals[0] if len(cals) == 1 else f"{len(cals)} calibrators") + (", select first" if select == "first" else "")
               + (", bias corrected" if bias_correction else ""))
        ctx.log(f"accuracy-aware search, {tag} (judged on {len(data.x_val)} val scenes)")
        out = ctx.workdir / ("auto-" + "-".join(cals) + f"-{select}" + ("-bc" if bias_correction else ""))
        return self._search_row(ctx, cfg, f"quantize: auto ({tag})", out, data, eval_s, macs)

    def accuracy(self, ctx: Context, spec: RowSpec, reference):
        """The row's figures on test, and each drop's 95% interval against fp32 on the same scenes
        (:func:`~edgeslim.components.common.confidence.detection_drops`: the paired bootstrap)."""
        from edgeslim.components.common.confidence import interval
        from edgeslim.components.common.onnx_runtime import SqnrAccumulator
        from edgeslim.components.tasks.detection.evaluate import detection_metrics, onnx_detections
        from edgeslim.components.common.confidence import detection_drops
        from edgeslim.components.tasks.detection.records import detection_records

        task = ctx.extra["task"]
        dets, outs, _ = onnx_detections(spec.path, ctx.data.x_test, task)
        m = detection_metrics(dets, list(ctx.data.y_test), task.num_classes, task.score_threshold)
        row = {k: m[k] for k in ("map50", "map50_95", "recall")}
        if reference is None:
            return {**row, "sqnr_db": None}, (outs, dets)
        acc = SqnrAccumulator()
        for r, c in zip(reference[0], outs):
            acc.add(r, c)
        stats = detection_drops(*(detection_records(d, list(ctx.data.y_test), task.num_classes, task.score_threshold)
                                  for d in (reference[1], dets)))
        for name in ("map50_drop", "map50_95_drop"):
            iv = interval(stats[name])
            row[f"{name}_95"] = [round(iv["low"], 2), round(iv["high"], 2)]
        return {**row, "sqnr_db": round(acc.db(), 2)}, None

    def targets(self, rows, ctx):
        """Per ``quantize: auto`` row: on test, mAP@0.5 within :data:`TARGET_MAP50_DROP` pt of fp32,
        mAP@0.5:0.95 no lower than fp32's, and at most :data:`TARGET_BYTES_SHARE` of the bytes of ModelOpt
        with Ultralytics' settings (where that row was built)."""
        fp32 = rows[0]
        peer = next((r for r in rows if r["row"] == ULTRALYTICS_ROW and "size_bytes" in r), None)
        out = {}
        for r in rows:
            if not r["row"].startswith("quantize: auto"):
                continue
            name = (f"{r['row']}: mAP@0.5 within {TARGET_MAP50_DROP} pt of fp32, mAP@0.5:0.95 not below it"
                    + (f", <= {TARGET_BYTES_SHARE:.0%} of ModelOpt's bytes" if peer else "") + " (test)")
            if "map50" not in r:  # no trial passed on val: nothing was found automatically
                out[name] = {"value": "no trial passed on val", "met": False}
                continue
            d50, d = fp32["map50"] - r["map50"], fp32["map50_95"] - r["map50_95"]
            share = r["size_bytes"] / peer["size_bytes"] if peer else None
            out[name] = {"value": [round(d50, 2), round(d, 2)] + ([round(share, 3)] if peer else []),
                         "met": d50 <= TARGET_MAP50_DROP and d <= 0.0 and (share is None or share <= TARGET_BYTES_SHARE)}
        return out

    def summary(self, ctx):
        out = {k: v for k, v in super().summary(ctx).items() if k != "note"}
        return {**out, "input": [3, TRAINED_SIZE, TRAINED_SIZE], "classes": list(SHAPES),
                "test_objects": int(sum(len(b) for b in ctx.data.y_test)), "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "train_s": ctx.extra["train_s"]}

    def notes(self, result):
        r = result
        head = (f"YOLOv8n trained here ({r['epochs']} epochs, {r['train_s']:.0f} s, {r['train_images']} scenes at "
                f"{r['input'][-1]} px); mAP against the drawn boxes on {r['test_images']} test scenes "
                f"({r['test_objects']} objects); the search chose on {r['val_images']} val scenes.")

        def won(row):
            w = row.get("winner") or {}
            return (f"trial {w['trial']} ({w['kind']} {w['calibrator']}, {w['placement']} placement)" if w
                    else "no trial passed on val")

        drops = ["drops from fp32 on test, with their 95% intervals (paired bootstrap over the test scenes):"] + [
            f"  {row['row']}: mAP@0.5 {row['map50_drop']:+.2f} {row['map50_drop_95']}, mAP@0.5:0.95 "
            f"{row['map50_95_drop']:+.2f} {row['map50_95_drop_95']}, {row['size_bytes']:,} B"
            for row in result["rows"] if "map50_drop_95" in row]
        return [head] + drops + [f"  {row['row']}: {won(row)}; float layers {row.get('float_layers', [])}; "
                                 f"{row.get('trials')} trial(s), search {row['search_s']:.1f} s "
                                 f"({row['search_cost_ratio']:.1f}x one evaluation pass over val)"
                                 for row in result["rows"] if "search_s" in row]
