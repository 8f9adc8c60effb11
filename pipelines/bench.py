"""``edgeslim bench``: the reference workloads of the one bench harness (:mod:`.bench_harness`).

- ``digits`` and ``mobile``: a digits classifier teacher (the VGG-style ``DigitsCNN``, or the
  inverted-residual ``DigitsMobileNet``): fp32, ONNX Runtime ``quantize_static`` with its defaults
  (what a user tries first), edgeslim PTQ (symmetric, per-channel Q/DQ, percentile calibration),
  the distilled + pruned student in fp32, and the full recipe (that student in int8);
- ``detect``: the YOLO-style detector (:mod:`.bench_detect`);
- ``resnet18``, ``mobilenetv3``, ``vit-tiny``: real classifier architectures at 224 (:mod:`.bench_archs`);
- ``yolov8n``: Ultralytics' YOLOv8n at 640, random weights, and the accuracy-aware search's cost
  (:mod:`.bench_yolo`); ``yolov8n-trained``: a YOLOv8n trained here at 192 pixels, PTQ and the search per
  calibrator, scored on test.

Accuracy and fidelity are measured in Q/DQ semantics (what TensorRT's int8 math approximates, see
docs/design.md); latency is ONNX Runtime on this CPU with its default optimizations. CPU int8 latency is
printed as measured: on x86 without VNNI it is no guide to int8 speed on a Jetson.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeslim.pipelines.bench_harness import (INTERVAL_COLUMNS, INTERVAL_NOTE, Column, Context, RowSpec, Workload,
                                              format_rows, run_workload, top1_drop_interval)
from edgeslim.pipelines.bench_peers import ort_quantize_static_defaults


class ReferenceClassifier(Workload):
    """The digits teacher (``DigitsCNN``, or the inverted-residual ``DigitsMobileNet``): fp32, ORT's
    default int8, edgeslim PTQ, the distilled + pruned student, and the full recipe."""

    name = "digits"
    columns = (Column("top1", "top-1 %", 7, ".2f"), *INTERVAL_COLUMNS, Column("top1_agreement", "agree", 6, ".3f"),
               Column("sqnr_db", "SQNR dB", 7, ".1f"))
    drops = {"top1_drop": ("top1", 3)}
    TARGETS = {  # the full recipe on the digits workload
        "size_ratio": 10.0,          # int8 student at least 10x smaller than the fp32 teacher ONNX
        "macs_ratio": 4.0,           # at least 4x fewer MACs
        "latency_b32_ratio": 2.5,    # fp32 student at least 2.5x lower CPU latency at batch 32 than the teacher
        "max_top1_drop": 1.0,        # int8 student within 1.0 point of the teacher's top-1
    }

    def recipe(self, quick: bool = False):
        """The compression recipe the bench runs: distil into a half-width student, then prune."""
        from edgeslim.components.common.stage_configs import (ChannelPruneConfig, LogitDistillConfig,
                                                              PTQQuantizeConfig)

        stages = [
            # The reference models train with a one-pixel shift (the figures in docs/benchmarks.md use it).
            LogitDistillConfig(student="width", width=0.5, epochs=1 if quick else 30, lr=3e-3,
                               temperature=4.0, alpha=0.7, augment=["shift"]),
            ChannelPruneConfig(keep_fraction=0.6, importance="l2", finetune_epochs=1 if quick else 10,
                               distill=True, augment=["shift"]),
        ]
        return stages, PTQQuantizeConfig(calibrator="percentile", num_samples=512)

    def make_teacher(self):
        from edgeslim.components.reference.digits import DigitsCNN

        return DigitsCNN(width=64)

    def prepare(self, ctx: Context) -> None:
        import torch

        from edgeslim.components.reference.digits import train_classifier
        from edgeslim.plugins.datasets import SklearnDigits

        ctx.data = SklearnDigits().load()
        torch.manual_seed(ctx.seed)
        model = self.make_teacher()
        epochs = 2 if ctx.quick else 25
        ctx.log(f"training the {type(model).__name__} teacher ({epochs} epochs)")
        ctx.teacher = train_classifier(model, ctx.data.x_train, ctx.data.y_train, epochs=epochs, seed=ctx.seed)

    def rows(self, ctx: Context) -> Iterator[RowSpec]:
        import torch

        from edgeslim.components.common.stage_configs import OnnxExportConfig
        from edgeslim.components.export import export
        from edgeslim.components.quantize.ptq import quantize
        from edgeslim.components.transform.prune import count_macs_params
        from edgeslim.components.transform.stages import apply_torch_stages

        data, teacher, wd = ctx.data, ctx.teacher, ctx.workdir
        one = torch.from_numpy(data.x_test[:1])
        t_macs = count_macs_params(teacher, one)[0]
        exp = OnnxExportConfig()
        t_onnx = Path(export(teacher, exp, data=data, out_path=wd / "teacher.fp32.onnx").model)
        yield RowSpec("fp32 teacher", t_onnx, t_macs)
        stages, ptq_cfg = self.recipe(ctx.quick)
        ctx.extra["recipe"] = [s.to_json_dict() for s in stages] + [ptq_cfg.to_json_dict()]
        ctx.log("quantizing (ORT defaults, edgeslim PTQ)")
        yield RowSpec("ORT quantize_static defaults (teacher)",
                      Path(ort_quantize_static_defaults(t_onnx, data, wd / "teacher.ort-default.int8.onnx")),
                      t_macs, int8=True)
        yield RowSpec("edgeslim PTQ (teacher)",
                      Path(quantize(t_onnx, ptq_cfg, data=data, out_dir=wd / "teacher-ptq").model), t_macs, int8=True)
        ctx.log("compressing: " + " -> ".join(f"{s.stage}({s.method})" for s in stages) + " -> int8")
        student = apply_torch_stages(teacher, stages, data=data, teacher=teacher, progress=lambda s, i, n, l: None)
        ctx.extra["stages"] = student.metrics["stages"]
        s_macs = count_macs_params(student.model, one)[0]
        s_onnx = Path(export(student.model, exp, data=data, out_path=wd / "student.fp32.onnx").model)
        yield RowSpec("distill + prune student, fp32", s_onnx, s_macs)
        yield RowSpec("full recipe: distill + prune + int8",
                      Path(quantize(s_onnx, ptq_cfg, data=data, out_dir=wd / "student-ptq").model), s_macs, int8=True)

    def accuracy(self, ctx: Context, spec: RowSpec, reference):
        from edgeslim.components.common.onnx_runtime import make_session, run_batched
        from edgeslim.components.tasks.classification.evaluate import fidelity, top1_percent

        data = ctx.data
        out = run_batched(make_session(spec.path, basic=True), data.x_test)
        row = {"top1": round(top1_percent(out, data.y_test), 3),
               **({"top1_agreement": 1.0, "sqnr_db": None} if reference is None else
                  {**fidelity(reference, out), **top1_drop_interval(reference, out, data.y_test)})}
        if spec.int8:
            fused = run_batched(make_session(spec.path, basic=False), data.x_test)
            row["cpu_int8_kernel_top1"] = round(top1_percent(fused, data.y_test), 3)
        return row, out

    def targets(self, rows, ctx):
        by = {r["row"]: r for r in rows}
        full, fp32_student = by.get("full recipe: distill + prune + int8"), by.get("distill + prune student, fp32")
        if not full or not fp32_student or "failed" in full or "failed" in fp32_student:
            return {}
        t = self.TARGETS
        checks = {
            "size_ratio": (full["size_ratio"], full["size_ratio"] >= t["size_ratio"]),
            "macs_ratio": (full["macs_ratio"], full["macs_ratio"] >= t["macs_ratio"]),
            "latency_b32_ratio (fp32 student vs fp32 teacher)": (
                fp32_student["latency_b32_ratio"], fp32_student["latency_b32_ratio"] >= t["latency_b32_ratio"]),
            "top1_drop (int8 student)": (full["top1_drop"], full["top1_drop"] <= t["max_top1_drop"]),
        }
        return {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()}

    def summary(self, ctx):
        return {"test_samples": int(len(ctx.data.x_test)), **ctx.extra}

    def notes(self, result):
        return [INTERVAL_NOTE] + [f"  {r['row']}: top-1 with ORT's fused int8 CPU kernels {r['cpu_int8_kernel_top1']:.2f}%"
                                  for r in result["rows"] if "cpu_int8_kernel_top1" in r]


class ReferenceMobile(ReferenceClassifier):
    name = "mobile"
    targets_apply = False  # the targets were set for the digits workload

    def make_teacher(self):
        from edgeslim.components.reference.mobile import DigitsMobileNet

        return DigitsMobileNet(width=1.0)


def _detect():
    from edgeslim.pipelines.bench_detect import ReferenceDetector

    return ReferenceDetector()


def _yolov8n():
    from edgeslim.pipelines.bench_yolo import YoloV8n

    return YoloV8n()


def _yolov8n_trained():
    from edgeslim.pipelines.bench_yolo import YoloV8nTrained

    return YoloV8nTrained()


def _lraspp():
    from edgeslim.pipelines.bench_segment import Lraspp

    return Lraspp()


def _yolov8n_seg_trained():
    from edgeslim.pipelines.bench_segment import YoloV8nSegTrained

    return YoloV8nSegTrained()


def _arch(name: str) -> Callable[[], Workload]:
    def make() -> Workload:
        from edgeslim.pipelines.bench_archs import ARCHS

        return ARCHS[name]()

    return make


WORKLOADS: dict[str, Callable[[], Workload]] = {"digits": ReferenceClassifier, "mobile": ReferenceMobile,
                                                "detect": _detect, "yolov8n": _yolov8n,
                                                "yolov8n-trained": _yolov8n_trained, "lraspp": _lraspp,
                                                "yolov8n-seg-trained": _yolov8n_seg_trained,
                                                **{a: _arch(a) for a in ("resnet18", "mobilenetv3", "vit-tiny")}}


def register(sub) -> None:
    p = sub.add_parser("bench", help="compare fp32, ORT's default int8, edgeslim's int8 and the full recipe")
    p.add_argument("--workload", choices=(*WORKLOADS, "data"), default="digits",
                   help="digits: the VGG-style DigitsCNN teacher (default); mobile: the inverted-residual net; "
                   "detect: the YOLO-style detector; resnet18, mobilenetv3, vit-tiny: real architectures at 224 "
                   "(torchvision, timm); yolov8n: Ultralytics' YOLOv8n at 640 with random weights (costs are real, "
                   "accuracy is not) and the accuracy-aware search's cost against one evaluation pass; yolov8n-trained: "
                   "a YOLOv8n trained here on shape scenes at 192, PTQ and quantize: auto per calibrator; lraspp: "
                   "LRASPP-MobileNetV3 trained here on shape scenes with masks at 64, mIoU of PTQ per calibrator "
                   "and quantize: auto; yolov8n-seg-trained: a YOLOv8n-seg trained here on shape scenes with instance "
                   "masks at 128, mask mAP of PTQ per calibrator and quantize: auto; data: a whole `edgeslim run` per "
                   "dataset size (--sizes) of an image-folder classifier and a YOLO-format detector, each task's peak "
                   "RSS and wall time")
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows to this JSON file")
    p.add_argument("--workdir", default=None, help="keep the models here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads for latency (default 1: steadier on shared machines)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per latency (median reported)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--sizes", default="2000,20000",
                   help="with --workload data: the dataset sizes in images, comma-separated (default 2000,20000)")
    p.add_argument("--quick", action="store_true",
                   help="a few epochs everywhere: checks the command works, not the targets")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from edgeslim.components.common.errors import ConfigError

    if args.repeats < 1 or args.threads < 0:
        raise ConfigError("bench: --repeats must be >= 1 and --threads >= 0 (0: ORT's default)")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.workload == "data":
        return _bench_data(args, log)
    wl = WORKLOADS[args.workload]()
    with tempfile.TemporaryDirectory(prefix="edgeslim-bench-") as tmp:
        result = run_workload(wl, workdir=args.workdir or tmp, threads=args.threads, repeats=args.repeats,
                              seed=args.seed, quick=args.quick, log=log)
        print(format_rows(result, wl))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=1, default=str))
    return 0


def _bench_data(args: argparse.Namespace, log) -> int:
    """``--workload data``: :func:`~edgeslim.pipelines.bench_data_run.pipeline_scale_bench` at ``--sizes``."""
    from edgeslim.components.common.errors import ConfigError
    from edgeslim.pipelines.bench_data_run import format_pipeline_bench, pipeline_scale_bench

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 100:
        raise ConfigError(f"bench --sizes {args.sizes!r}: give dataset sizes of 100 images or more, "
                          "comma-separated, e.g. 2000,20000")
    result = pipeline_scale_bench(sizes, workdir=args.workdir, progress=log)
    print(format_pipeline_bench(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1, default=str))
    return 0
