"""``edgeslim bench --workload resnet18|mobilenetv3|vit-tiny``: real architectures at 224x224x3, as
workloads of the one bench harness (:mod:`.bench_harness`).

No weights can be downloaded here, so each network is trained from scratch, briefly, on scikit-learn's
digits drawn at 224x224 in three channels (:class:`Upscaled`, made a batch at a time, never held whole).
The figures are therefore what compression does to *this* network on *this* task: sizes, MACs, latency
and fidelity are the architecture's own; absolute top-1 is that of a few epochs from scratch.

Rows: the fp32 network; ONNX Runtime ``quantize_static`` with its defaults; edgeslim PTQ (percentile,
Q/DQ on every op) and PTQ with TensorRT's placement (``weighted``); the accuracy-aware search (PTQ per
calibrator, then layers or output tails kept float, judged on the validation split); the pruned network
(structural pruning to ``keep`` of its MACs, distilled fine-tuning) in fp32; and the full recipe, that
pruned network in int8.

torchvision and timm come with the test extra (``pip install -e '.[test]'``); this module imports them
only when its workload runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgeslim.components.common.errors import MissingDependencyError
from edgeslim.pipelines.bench_harness import (INTERVAL_COLUMNS, INTERVAL_NOTE, Column, Context, RowSpec, Workload,
                                              top1_drop_interval)
from edgeslim.pipelines.bench_peers import ort_quantize_static_defaults

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


class Upscaled:
    """A lazy split: 8x8 grey digits (N, 1, 8, 8) in [0, 1] as (N, 3, size, size) float32 images,
    bilinear, ImageNet-normalised, made for the rows asked for."""

    def __init__(self, x8: np.ndarray, size: int = 224) -> None:
        self.x8, self.size = np.ascontiguousarray(x8, np.float32), size
        self.shape = (len(x8), 3, size, size)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.x8)

    def __getitem__(self, idx) -> np.ndarray:
        import torch

        rows = self.x8[idx]
        single = rows.ndim == 3
        t = torch.from_numpy(rows[None] if single else rows)
        up = torch.nn.functional.interpolate(t, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (up.repeat(1, 3, 1, 1).numpy() - IMAGENET_MEAN) / IMAGENET_STD
        return np.ascontiguousarray(x[0] if single else x, np.float32)

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(self.x8.tobytes() + str(self.size).encode()).hexdigest()


def _torchvision(name: str) -> Callable[[int], Any]:
    def build(num_classes: int):
        try:
            import torchvision
        except ImportError:
            raise MissingDependencyError("torchvision", why="the bench's torchvision workloads build their "
                                         "networks with it") from None
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


def _timm(name: str) -> Callable[[int], Any]:
    def build(num_classes: int):
        try:
            import timm
        except ImportError:
            raise MissingDependencyError("timm", why="the bench's timm workloads build their networks with it") \
                from None
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build


class ArchClassifier(Workload):
    """A real classifier architecture at 224, trained briefly from scratch on upscaled digits."""

    columns = (Column("top1", "top-1 %", 7, ".2f"), *INTERVAL_COLUMNS, Column("top1_agreement", "agree", 6, ".3f"),
               Column("sqnr_db", "SQNR dB", 7, ".1f"))
    drops = {"top1_drop": ("top1", 3)}
    targets_apply = False

    def __init__(self, name: str, build: Callable[[int], Any], *, epochs: int = 3, lr: float = 1e-3,
                 batch_size: int = 32, keep: float = 0.6, finetune_epochs: int = 1, calib_samples: int = 256,
                 max_test: int = 360) -> None:
        self.name, self.build = name, build
        self.epochs, self.lr, self.batch_size, self.keep = epochs, lr, batch_size, keep
        self.finetune_epochs, self.calib_samples, self.max_test = finetune_epochs, calib_samples, max_test

    def prepare(self, ctx: Context) -> None:
        import torch

        from edgeslim.components.common.data import Splits
        from edgeslim.components.transform.train import TrainConfig, fit
        from edgeslim.plugins.datasets import SklearnDigits

        d = SklearnDigits(seed=ctx.seed).load()
        if ctx.quick:  # a smoke run: figures mean nothing
            self.epochs, self.finetune_epochs, self.calib_samples, self.max_test = 1, 1, 32, 64
            d = Splits(d.x_train[:128], d.y_train[:128], d.x_val[:64], d.y_val[:64], d.x_test, d.y_test)
        n = min(self.max_test, len(d.x_test))
        ctx.data = Splits(Upscaled(d.x_train), d.y_train, Upscaled(d.x_val), d.y_val,
                          Upscaled(d.x_test[:n]), d.y_test[:n], source="sklearn-digits at 224x224x3")
        torch.manual_seed(ctx.seed)
        model = self.build(10)
        ctx.log(f"training {self.name} from scratch at 224 ({self.epochs} epochs, {len(d.x_train)} images)")
        # a few epochs from scratch: MobileNetV3's BatchNorm momentum 0.01 lags, so recalibrate
        ctx.teacher = fit(model, TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                             seed=ctx.seed, recalibrate_batchnorm=True),
                          x=ctx.data.x_train, y=ctx.data.y_train,
                          progress=lambda e, n_, loss: ctx.log(f"  epoch {e}/{n_} loss {loss:.3f}"))

    def rows(self, ctx: Context) -> Iterator[RowSpec]:
        import torch

        from edgeslim.components.common.stage_configs import (AccuracyAwareQuantizeConfig, ChannelPruneConfig,
                                                              OnnxExportConfig, PTQQuantizeConfig)
        from edgeslim.components.export import export
        from edgeslim.components.quantize.apply import quantize
        from edgeslim.components.tasks.classification.search import ClassifierStrategy
        from edgeslim.components.recipe import AccuracyGateConfig
        from edgeslim.components.transform.prune import count_macs_params, prune

        data, teacher, wd, log = ctx.data, ctx.teacher, ctx.workdir, ctx.log
        one = torch.from_numpy(data.x_test[:1])
        macs = count_macs_params(teacher, one)[0]
        exp = OnnxExportConfig(check_samples=8)
        fp32 = Path(export(teacher, exp, data=data, out_path=wd / "fp32.onnx").model)
        yield RowSpec("fp32", fp32, macs)
        log("quantizing: ORT defaults, edgeslim PTQ")
        yield RowSpec("ORT quantize_static defaults", ort_quantize_static_defaults(fp32, data, wd / "ort.onnx"), macs,
                      int8=True)
        for placement in ("all", "weighted"):
            cfg = PTQQuantizeConfig(calibrator="percentile", num_samples=self.calib_samples, placement=placement)
            res = quantize(fp32, cfg, data=data, out_dir=wd / f"ptq-{placement}")
            yield RowSpec(f"edgeslim PTQ percentile{', weighted' if placement == 'weighted' else ''}",
                          Path(res.model), macs, int8=True)
        gate = AccuracyGateConfig(max_metric_drop=1.0, min_top1_agreement=0.97, min_sqnr_db=15.0)
        auto = AccuracyAwareQuantizeConfig(calibrators=["percentile", "entropy"], num_samples=self.calib_samples,
                                           max_float_layers=3, qat=False, placement="weighted")
        log("accuracy-aware search (PTQ per calibrator, then float fallback; judged on val)")
        try:
            res = quantize(fp32, auto, data=data, out_dir=wd / "auto", model=teacher,
                           strategy=ClassifierStrategy(fp32, gate, model=teacher, export_config=exp),
                           progress=lambda m: log("    " + m))
            yield RowSpec("edgeslim accuracy-aware", Path(res.model), macs, int8=True,
                          extra={"float_layers": res.metrics.get("float_layers"), "search": res.metrics.get("reason")})
        except Exception as exc:  # no trial passed the gate: a row with the reason
            yield RowSpec("edgeslim accuracy-aware", None, failed=" ".join(str(exc).split())[:300])
        log(f"pruning to {self.keep:.0%} of the MACs, {self.finetune_epochs} distilled fine-tuning epoch(s)")
        try:
            pruned = prune(teacher, ChannelPruneConfig(keep_fraction=self.keep, finetune_epochs=self.finetune_epochs,
                                                       lr=self.lr / 2, batch_size=self.batch_size, distill=True),
                           data=data, teacher=teacher)
        except Exception as exc:
            yield RowSpec("pruned, fp32", None, failed=" ".join(str(exc).split())[:300])
            return
        s_macs = count_macs_params(pruned.model, one)[0]
        s_fp32 = Path(export(pruned.model, exp, data=data, out_path=wd / "pruned.fp32.onnx").model)
        yield RowSpec("pruned, fp32", s_fp32, s_macs)
        res = quantize(s_fp32, PTQQuantizeConfig(calibrator="percentile", num_samples=self.calib_samples),
                       data=data, out_dir=wd / "pruned-ptq")
        yield RowSpec("full recipe: prune + int8", Path(res.model), s_macs, int8=True)

    def accuracy(self, ctx: Context, spec: RowSpec, reference):
        from edgeslim.components.common.onnx_runtime import make_session, run_batched
        from edgeslim.components.tasks.classification.evaluate import fidelity, top1_percent

        out = run_batched(make_session(spec.path, basic=True), ctx.data.x_test, batch=32)
        row = {"top1": round(top1_percent(out, ctx.data.y_test), 3),
               **({"top1_agreement": 1.0, "sqnr_db": None} if reference is None else
                  {**fidelity(reference, out), **top1_drop_interval(reference, out, ctx.data.y_test)})}
        return row, out

    def summary(self, ctx: Context) -> dict[str, Any]:
        return {"test_samples": int(len(ctx.data.x_test)), "input": [3, 224, 224], "train_epochs": self.epochs,
                "note": "trained from scratch on upscaled digits (no weights can be downloaded here)"}

    def notes(self, result: dict[str, Any]) -> list[str]:
        return [f"{result['test_samples']} test images (sklearn digits drawn at 224x224x3); the network was "
                f"trained {result['train_epochs']} epoch(s) from scratch, so top-1 is not the architecture's best.",
                INTERVAL_NOTE]


ARCHS: dict[str, Callable[[], Workload]] = {
    "resnet18": lambda: ArchClassifier("resnet18", _torchvision("resnet18")),
    # 2e-3 diverged in the second epoch (loss 0.67 -> 1.98, test top-1 at chance): 1e-3
    "mobilenetv3": lambda: ArchClassifier("mobilenetv3", _torchvision("mobilenet_v3_small"), lr=1e-3),
    "vit-tiny": lambda: ArchClassifier("vit-tiny", _timm("deit_tiny_patch16_224"), lr=5e-4),
}
