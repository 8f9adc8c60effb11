"""``edgeslim bench --workload lraspp`` and ``--workload yolov8n-seg-trained``: torchvision's LRASPP head on a MobileNetV3-Small backbone (dilated,
as torchvision builds its LRASPP-MobileNetV3), trained here on shape scenes with their class maps, through
int8: a workload of the one bench harness (:mod:`.bench_harness`).

Nothing is downloaded: the network starts from random weights and is trained with the segmentation task's
``train_segmenter`` (per-pixel cross-entropy) on synthetic scenes of rectangles, discs and triangles
(4 classes with the background) at 64 pixels: small enough to train on two busy CPU cores in minutes (the
Large backbone at 96 pixels took 15 minutes an epoch there). Rows: fp32; edgeslim PTQ per calibrator; the accuracy-aware search
(``quantize: auto``, every calibrator, QAT off), judged on val by the segmentation gate at 1.0 pt of mIoU.
Every row is scored on the test split: mIoU, pixel accuracy, the worst class's IoU and the logits' SQNR
against fp32. The search's cost is reported as a ratio to one evaluation pass over val.

:class:`YoloV8nSegTrained` does the same for instance segmentation with Ultralytics' YOLOv8n-seg (mask mAP).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

from edgeslim.components.common.errors import MissingDependencyError
from edgeslim.pipelines.bench_harness import Column, Context, RowSpec, Workload

SIZE = 64
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
MIOU_TARGET = 1.0  # points of mIoU an int8 row may lose against fp32 on test


def search_cost(search_s: float, eval_s: float, autotune: Path) -> dict[str, Any]:
    """What a search cost: its seconds, and their ratio to one evaluation pass over val (``eval_s``)."""
    import json

    report = json.loads(autotune.read_text()) if autotune.is_file() else {}
    return {"search_s": round(search_s, 1), "eval_pass_s": round(eval_s, 2),
            "search_cost_ratio": round(search_s / max(eval_s, 1e-9), 1), "trials": len(report.get("trials", []))}


def search_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per search row: the winner (or none), the layers left in float, the search's cost."""
    lines = []
    for row in rows:
        if "search_s" in row:
            w = row.get("winner") or {}
            won = f"trial {w.get('trial')} ({w.get('kind')} {w.get('calibrator')})" if w else "no trial passed on val"
            lines.append(f"  {row['row']}: {won}; float layers {row.get('float_layers', [])}; {row['trials']} "
                         f"trial(s), search {row['search_s']:.1f} s ({row['search_cost_ratio']:.1f}x one "
                         "evaluation pass over val)")
    return lines


class SegmentBench(Workload):
    """What both segmentation workloads share: the teacher trained and exported, then the fp32, PTQ per
    calibrator and ``quantize: auto`` rows, each scored on the test split (the metrics ``scored``, and the SQNR
    of the outputs ``compared`` against fp32's), and each int8 row's ``target``."""

    scored: tuple[str, ...] = ()  # the metrics a row reports
    target: tuple[str, float, str] = ("", 0.0, "")  # (metric, points an int8 row may lose on test, its words)

    def evaluate(self, paths, x, y, task, on_batch=None) -> list:
        """Per model what :meth:`metrics` reads, on ``x`` against ``y``; ``on_batch(raw, ...)`` as the task's
        evaluator calls it."""
        raise NotImplementedError

    def metrics(self, result, task) -> dict[str, Any]:
        raise NotImplementedError

    def compared(self, outs, names, task):
        """The array of one model's outputs on a batch that the SQNR against fp32 is measured on."""
        raise NotImplementedError

    def strategy(self, fp32: Path, task):
        """The search strategy that judges the ``quantize: auto`` trials."""
        raise NotImplementedError

    def train_and_export(self, ctx: Context, model, fit, *, loss_format: str, onnx_name: str, export_config) -> None:
        """``fit(progress)`` trains ``model`` (``progress(epoch, epochs, loss)`` logs a line an epoch); the
        trained model becomes the teacher, exported to ``onnx_name`` in the workdir as the fp32 row."""
        from edgeslim.components.export import export

        t = time.perf_counter()
        fit(lambda e, n_e, loss: ctx.log(f"  epoch {e}/{n_e} loss {loss:{loss_format}} "
                                         f"({time.perf_counter() - t:.0f} s)"))
        ctx.extra["train_s"] = round(time.perf_counter() - t, 1)
        ctx.teacher = model.eval()
        ctx.extra["fp32"] = Path(export(ctx.teacher, export_config, data=ctx.data,
                                        out_path=ctx.workdir / onnx_name).model)

    def rows(self, ctx: Context) -> Iterator[RowSpec]:
        import torch

        from edgeslim.components.common.errors import GateRejected
        from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig, PTQQuantizeConfig
        from edgeslim.components.quantize.ptq import quantize
        from edgeslim.components.quantize.search import search
        from edgeslim.components.transform.prune import count_macs_params

        data, task, wd, fp32 = ctx.data, ctx.extra["task"], ctx.workdir, ctx.extra["fp32"]
        macs = count_macs_params(ctx.teacher, torch.from_numpy(data.x_test[:1]))[0]
        yield RowSpec("fp32", fp32, macs)
        t = time.perf_counter()
        self.evaluate([fp32], data.x_val, data.y_val, task)
        eval_s = time.perf_counter() - t
        cals = CALIBRATORS[:1 if ctx.quick else None]
        for cal in cals:
            ctx.log(f"PTQ {cal}")
            res = quantize(fp32, PTQQuantizeConfig(calibrator=cal, num_samples=self.calib_samples), data=data,
                           out_dir=wd / f"ptq-{cal}")
            yield RowSpec(f"PTQ {cal}", Path(res.model), macs, int8=True)
        cfg = AccuracyAwareQuantizeConfig(calibrators=list(cals), num_samples=self.calib_samples, qat=False)
        ctx.log(f"accuracy-aware search, calibrators {', '.join(cals)} (judged on {len(data.x_val)} val scenes)")
        t = time.perf_counter()
        name = "quantize: auto"
        try:
            res = search(fp32, cfg, strategy=self.strategy(fp32, task), data=data, out_dir=wd / "auto",
                         progress=lambda m: ctx.log("    " + m))
        except GateRejected as exc:
            yield RowSpec(name, None, failed=" ".join(str(exc).split())[:300],
                          extra=search_cost(time.perf_counter() - t, eval_s, wd / "auto" / "autotune.json"))
            return
        yield RowSpec(name, Path(res.model), macs, int8=True, extra={
            "winner": res.metrics.get("winner"), "float_layers": res.metrics.get("float_layers", []),
            **search_cost(time.perf_counter() - t, eval_s, wd / "auto" / "autotune.json")})

    def accuracy(self, ctx: Context, spec: RowSpec, reference):
        from edgeslim.components.common.onnx_runtime import SqnrAccumulator

        task, kept, acc = ctx.extra["task"], [], SqnrAccumulator()

        def on_batch(raw, *_):
            out = self.compared(raw[0][0], raw[0][1], task)
            if reference is None:
                kept.append(out)
            else:
                acc.add(reference[len(kept)], out)
                kept.append(None)

        (result,) = self.evaluate([spec.path], ctx.data.x_test, ctx.data.y_test, task, on_batch=on_batch)
        m = self.metrics(result, task)
        row = {k: m[k] for k in self.scored}
        if reference is None:
            return {**row, "sqnr_db": None}, kept
        return {**row, "sqnr_db": round(acc.db(), 2)}, None

    def targets(self, rows, ctx):
        key, points, words = self.target
        fp32, out = rows[0], {}
        for r in rows[1:]:
            name = f"{r['row']}: within {points} pt {words} of fp32 on test"
            if key not in r:
                out[name] = {"value": r.get("failed", "no model"), "met": False}
                continue
            drop = fp32[key] - r[key]
            out[name] = {"value": round(drop, 3), "met": drop <= points}
        return out


def lraspp(num_classes: int, inter_channels: int = 64):
    """LRASPP on a dilated MobileNetV3-Small with random weights (torchvision's own LRASPP-MobileNetV3 recipe:
    the low-level features from the fourth-last stage, the high-level from the last), returning its logits
    tensor (torchvision's returns ``{"out": logits}``, which is how a user wraps it to log it)."""
    import torch

    try:
        from torchvision.models import mobilenet_v3_small
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation.lraspp import LRASPP
    except ImportError:
        raise MissingDependencyError("torchvision", why="the lraspp bench builds its network with it") from None

    class LrasppLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            bb = mobilenet_v3_small(weights=None, dilated=True).features
            stages = [0] + [i for i, b in enumerate(bb) if getattr(b, "_is_cn", False)] + [len(bb) - 1]
            low, high = stages[-4], stages[-1]
            self.net = LRASPP(IntermediateLayerGetter(bb, return_layers={str(low): "low", str(high): "high"}),
                              bb[low].out_channels, bb[high].out_channels, num_classes, inter_channels)

        def forward(self, x):
            return self.net(x)["out"]

    return LrasppLogits()


class Lraspp(SegmentBench):
    """LRASPP-MobileNetV3 trained on shape scenes: fp32, PTQ per calibrator, ``quantize: auto``."""

    name = "lraspp"
    columns = (Column("sqnr_db", "SQNR dB", 7, ".1f"), Column("miou", "mIoU", 6, ".2f"),
               Column("pixel_accuracy", "pix acc", 7, ".2f"), Column("worst_class_iou", "worst IoU", 9, ".2f"))
    drops = {"miou_drop": ("miou", 3)}
    scored = ("miou", "pixel_accuracy", "worst_class_iou")
    target = ("miou", MIOU_TARGET, "mIoU")

    def __init__(self, *, n_train: int = 160, n_val: int = 48, n_test: int = 64, calib_samples: int = 64,
                 epochs: int = 6, batch_size: int = 16, lr: float = 1e-2) -> None:
        self.n_train, self.n_val, self.n_test, self.calib_samples = n_train, n_val, n_test, calib_samples
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr

    def prepare(self, ctx: Context) -> None:
        import numpy as np
        import torch

        from edgeslim.components.common.data import Splits
        from edgeslim.components.common.stage_configs import OnnxExportConfig
        from edgeslim.components.common.tasks import task_from_dict
        from edgeslim.components.tasks.segmentation.reference import NUM_CLASSES, as_inputs, shape_scenes
        from edgeslim.components.tasks.segmentation.train import train_segmenter

        if ctx.quick:  # a smoke run: figures mean nothing
            self.n_train, self.n_val, self.n_test, self.calib_samples, self.epochs = 8, 4, 4, 4, 1
            self.batch_size = 4
        n = self.n_train + self.n_val + self.n_test
        images, masks = shape_scenes(n, SIZE, ctx.seed)
        x, y = as_inputs(images), masks.astype(np.int64)
        a, b = self.n_train, self.n_train + self.n_val
        ctx.data = Splits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], source=f"shape scenes at {SIZE}")
        task = ctx.extra["task"] = task_from_dict({"kind": "segmentation", "num_classes": NUM_CLASSES,
                                                   "gate": {"max_miou_drop": MIOU_TARGET}})
        torch.manual_seed(ctx.seed)
        model = lraspp(NUM_CLASSES)
        ctx.log(f"LRASPP-MobileNetV3-Small, {n} shape scenes at {SIZE}x{SIZE} ({a}/{self.n_val}/{self.n_test}); "
                f"training {self.epochs} epochs, batch {self.batch_size}")
        # MobileNetV3's BatchNorm momentum is 0.01: after a few hundred steps its running statistics are still
        # near their start, so they get the training inputs' average at the end (recalibrate_batchnorm).
        self.train_and_export(ctx, model, lambda progress: train_segmenter(
            model, ctx.data, task, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=ctx.seed,
            recalibrate_batchnorm=True, progress=progress), loss_format=".4f", onnx_name="lraspp.fp32.onnx",
            export_config=OnnxExportConfig(check_samples=2))

    def evaluate(self, paths, x, y, task, on_batch=None):
        from edgeslim.components.tasks.segmentation.evaluate import segment_batches

        return segment_batches(paths, x, y, task, on_batch=on_batch)

    def metrics(self, result, task):
        from edgeslim.components.tasks.segmentation.evaluate import segmentation_metrics

        return segmentation_metrics(result)

    def compared(self, outs, names, task):
        from edgeslim.components.tasks.segmentation.runtime import logits_output

        return logits_output(dict(zip(names, outs)), task)

    def strategy(self, fp32, task):
        from edgeslim.components.tasks.segmentation.search import SegmenterStrategy

        return SegmenterStrategy(fp32, task)

    def summary(self, ctx):
        return {"input": [3, SIZE, SIZE], "train_images": self.n_train, "val_images": self.n_val,
                "test_images": self.n_test, "epochs": self.epochs, "train_s": ctx.extra.get("train_s"),
                "calibrators": list(CALIBRATORS), "calib_samples": self.calib_samples}

    def notes(self, result):
        r = result
        return [f"LRASPP-MobileNetV3-Small trained here ({r['epochs']} epochs, {r['train_s']:.0f} s, "
                f"{r['train_images']} scenes at {r['input'][-1]} px); mIoU over 4 classes on {r['test_images']} "
                f"test scenes; the search chose on {r['val_images']} val scenes.", *search_notes(r["rows"])]

SEG_SIZE = 128


class YoloV8nSegTrained(SegmentBench):
    """``edgeslim bench --workload yolov8n-seg-trained``: Ultralytics' YOLOv8n-seg (``yolov8n-seg.yaml``, ``nc`` 3,
    random initial weights: nothing is downloaded) trained here for a few epochs on shape scenes with one
    instance label per shape at 128 pixels, with the segmentation task's ``train_instance_segmenter``
    (Ultralytics' own v8SegmentationLoss); then fp32, PTQ per calibrator and ``quantize: auto`` (every
    calibrator, QAT off, judged on val by the instance gate at 1.0 pt of mask mAP), every row scored on the
    test split: box and mask mAP@0.5:0.95, mask mAP@0.5, and the raw outputs' SQNR against fp32."""

    name = "yolov8n-seg-trained"
    columns = (Column("sqnr_db", "SQNR dB", 7, ".1f"), Column("mask_map50", "mask50", 6, ".2f"),
               Column("mask_map50_95", "mask50-95", 9, ".2f"), Column("box_map50_95", "box50-95", 8, ".2f"))
    drops = {"mask_map50_95_drop": ("mask_map50_95", 3)}
    latency_batches = (1,)
    scored = ("mask_map50", "mask_map50_95", "box_map50_95", "mean_tp_score")
    target = ("mask_map50_95", 1.0, "mask mAP@0.5:0.95")

    def __init__(self, *, n_train: int = 192, n_val: int = 48, n_test: int = 64, calib_samples: int = 32,
                 epochs: int = 6, batch_size: int = 8, lr: float = 3e-3) -> None:
        self.n_train, self.n_val, self.n_test, self.calib_samples = n_train, n_val, n_test, calib_samples
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr

    def prepare(self, ctx: Context) -> None:
        import os

        import torch

        from edgeslim.components.common.data import Splits
        from edgeslim.components.common.stage_configs import OnnxExportConfig
        from edgeslim.components.common.tasks import task_from_dict
        from edgeslim.components.tasks.segmentation.reference import as_inputs, instance_scenes
        from edgeslim.components.tasks.segmentation.train_instance import train_instance_segmenter

        if ctx.quick:  # a smoke run: one epoch on a few scenes, figures mean nothing
            self.n_train, self.n_val, self.n_test, self.calib_samples, self.epochs, self.batch_size = 8, 4, 4, 4, 1, 4
        os.environ.setdefault("YOLO_OFFLINE", "1")
        try:
            from ultralytics.nn.tasks import SegmentationModel
        except ImportError:
            raise MissingDependencyError("ultralytics", why="the yolov8n-seg-trained bench builds its network with it") \
                from None
        n = self.n_train + self.n_val + self.n_test
        images, labels = instance_scenes(n, SEG_SIZE, ctx.seed)
        x = as_inputs(images)
        a, b = self.n_train, self.n_train + self.n_val
        ctx.data = Splits(x[:a], labels[:a], x[a:b], labels[a:b], x[b:], labels[b:],
                          source=f"instance shape scenes at {SEG_SIZE}")
        task = ctx.extra["task"] = task_from_dict({"kind": "segmentation", "format": "yolo-seg", "num_classes": 3,
                                                   "gate": {"max_mask_map_drop": 1.0, "max_mask_map50_95_drop": 1.0}})
        torch.manual_seed(ctx.seed)
        model = SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)  # YOLO("yolov8n-seg.yaml").model's class
        ctx.log(f"YOLOv8n-seg (nc=3), {n} shape scenes at {SEG_SIZE}x{SEG_SIZE} ({a}/{self.n_val}/{self.n_test}); "
                f"training {self.epochs} epochs, batch {self.batch_size}")
        self.train_and_export(ctx, model, lambda progress: train_instance_segmenter(
            model, ctx.data.x_train, ctx.data.y_train, task, epochs=self.epochs, lr=self.lr,
            batch_size=self.batch_size, seed=ctx.seed, progress=progress), loss_format=".3f",
            onnx_name="yolov8n-seg.fp32.onnx", export_config=OnnxExportConfig(check_samples=2, atol=0.1))

    def evaluate(self, paths, x, y, task, on_batch=None):
        from edgeslim.components.tasks.segmentation.instance_eval import instance_batches

        return instance_batches(paths, x, y, task, on_batch=on_batch)

    def metrics(self, result, task):
        from edgeslim.components.tasks.segmentation.instance_eval import instance_metrics

        return instance_metrics(result, task.num_classes, task.score_threshold)

    def compared(self, outs, names, task):
        import numpy as np

        return np.concatenate([o.reshape(len(o), -1) for o in outs], 1)

    def strategy(self, fp32, task):
        from edgeslim.components.tasks.segmentation.search import InstanceStrategy

        return InstanceStrategy(fp32, task)

    def summary(self, ctx):
        return {"input": [3, SEG_SIZE, SEG_SIZE], "train_images": self.n_train, "val_images": self.n_val,
                "test_images": self.n_test, "epochs": self.epochs, "train_s": ctx.extra.get("train_s"),
                "test_instances": int(sum(len(v) for v in ctx.data.y_test)), "calibrators": list(CALIBRATORS)}

    def notes(self, result):
        return [f"YOLOv8n-seg trained here ({result['epochs']} epochs, {result['train_s']:.0f} s, "
                f"{result['train_images']} scenes at {SEG_SIZE} px); mask and box mAP against the drawn shapes on "
                f"{result['test_images']} test scenes ({result['test_instances']} instances).",
                *search_notes(result["rows"])]
