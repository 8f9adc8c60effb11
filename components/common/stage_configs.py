"""Settings of every stage method, one small dataclass each.

They live together, away from the stage code, so that a recipe can be
validated completely without importing torch or onnxruntime.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from edgeslim.components.common.config import StageConfig
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.registry import Registry

# The calibrators a quantize config may name: the entry-point group ``edgeslim.calibrators``
# (the built-in minmax, entropy, percentile and mse included). Configs check names only; the
# functions, and what one takes and returns, are in components/quantize/calibrate.py.
CALIBRATORS: Registry = Registry("edgeslim.calibrators", "calibrator")
# Training-time augmentations a fine-tuning stage may apply to its input batches (none by default:
# nothing is assumed about the model's inputs). ``shift``: roll each batch by up to one pixel
# (what the digits reference models train with); ``hflip``: mirror each image left-right with
# probability 1/2 (natural images; not for detectors trained on box labels).
Augmentation = Literal["shift", "hflip"]


def _check_augment(where: str, augment: list[str]) -> None:
    if len(set(augment)) != len(augment):
        raise ConfigError(f"{where}.augment: {augment} repeats an augmentation; list each once")


DEFAULT_OPSET = 18  # the lowest the torch.export-based exporter writes


@dataclasses.dataclass(frozen=True)
class OnnxExportConfig(StageConfig):
    """Export to ONNX with a dynamic batch axis and a pinned opset.

    Attributes:
        opset: ONNX opset; unset: the highest, 18 at most, that the TensorRT of every class in
            ``engines.device_classes`` parses (17 for TensorRT 8.5). The torch.export-based
            exporter writes 18 or newer; a lower opset is converted from its 18.
        atol: the absolute part of the export check's tolerance:
            ``|onnx - torch| <= atol + rtol * max|torch channel|`` (channels on axis 1).
        rtol: the relative part of that tolerance, a share of the largest |torch value| of the same
            output channel: outputs in pixels (a detector's boxes, up to 640) differ by more than 1e-3
            from float32 rounding alone.
        check_samples: how many test samples the export check runs.
    """

    stage = "export"
    method = "onnx"
    is_default = True
    opset: Optional[int] = None
    atol: float = 1e-3
    rtol: float = 1e-4
    check_samples: int = 64

    @property
    def resolved_opset(self) -> int:
        """The opset the export writes: ``opset``, else ``DEFAULT_OPSET``."""
        return DEFAULT_OPSET if self.opset is None else self.opset

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("opset") is None:  # unset: written only once the recipe resolves it
            out.pop("opset", None)
        return out

    def validate(self) -> None:
        if self.opset is not None and not 13 <= self.opset <= 23:
            raise ConfigError(
                f"export.opset: got {self.opset}; Q/DQ per-channel needs opset 13 or newer and "
                "onnx supports up to 23: use a value in 13..23 (default 18)"
            )
        if self.atol <= 0:
            raise ConfigError(f"export.atol: got {self.atol}; use a positive tolerance like 1e-3")
        if not 0 <= self.rtol < 1:
            raise ConfigError(f"export.rtol: got {self.rtol}; use a share of the output's magnitude like 1e-4")
        if self.check_samples < 1:
            raise ConfigError(f"export.check_samples: got {self.check_samples}; use 1 or more")


def _check_calibrator(key: str, name: str) -> None:
    if name not in CALIBRATORS:
        raise ConfigError(f"{key}: {CALIBRATORS.unknown(name)}")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The calibration settings that PTQ, QAT and the accuracy-aware search share (each config
    documents them); their checks and errors (``quantize.<key>``) are the same in all three."""

    num_samples: int = 512
    percentile: float = 99.99
    num_bins: int = 2048
    float_layers: list[str] = dataclasses.field(default_factory=list)

    def check_calibration(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(
                f"quantize.num_samples: got {self.num_samples}; use at least 1 (typical 256..1024)"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(
                f"quantize.percentile: got {self.percentile}; use a value in (50, 100], e.g. 99.99"
            )
        if self.num_bins < 128:
            raise ConfigError(
                f"quantize.num_bins: got {self.num_bins}; use at least 128 (TensorRT uses 2048)"
            )

    def calibration(self, **changes: Any) -> dict[str, Any]:
        """These settings, with ``changes``, as keyword arguments of another config."""
        return {"num_samples": self.num_samples, "percentile": self.percentile, "num_bins": self.num_bins,
                "float_layers": list(self.float_layers), **changes}


@dataclasses.dataclass(frozen=True)
class OneCalibrator(Calibration):
    """Calibration by one calibrator, a name in :data:`CALIBRATORS` (PTQ and QAT; the search tries several)."""

    calibrator: str = "percentile"

    def check_calibration(self) -> None:
        _check_calibrator("quantize.calibrator", self.calibrator)
        super().check_calibration()

    def calibration(self, **changes: Any) -> dict[str, Any]:
        return super().calibration(**{"calibrator": self.calibrator, **changes})


@dataclasses.dataclass(frozen=True)
class PTQQuantizeConfig(OneCalibrator, StageConfig):
    """Post-training int8 quantization into a Q/DQ ONNX that TensorRT consumes.

    Symmetric (zero points all 0) with per-channel weight scales on the
    output-channel axis, as TensorRT's explicit quantization wants.

    Attributes:
        calibrator: how activation ranges are chosen from calibration data: a name in
            :data:`CALIBRATORS` (``minmax``, ``entropy``, ``percentile``, ``mse`` or your own).
        num_samples: calibration samples, drawn from the train split only.
        percentile: for ``percentile``, the percentile of |x| kept unclipped.
        num_bins: histogram bins for ``entropy``/``mse``/``percentile`` at the width the first calibration
            batches set (TensorRT uses 2048); later, larger values add bins of that width.
        float_layers: node names or fnmatch patterns kept in float.
        placement: where Q/DQ pairs go. ``all``: every op ONNX Runtime can quantize
            (activations such as Sigmoid, Mul, Concat, Resize, Softmax included), while
            parameters other than conv/linear weights (a Linear's bias Add after its MatMul,
            LayerNorm's affine, a layer-scale gamma) stay float; ``weighted``: only the
            inputs of Conv/ConvTranspose/Gemm/MatMul, TensorRT's recommended placement,
            where pointwise ops run in higher precision inside fused layers. Both put Q/DQ
            on both inputs of an attention MatMul.
        bias_correction: after quantizing, remove from each Conv/Gemm bias the mean shift that
            rounding its weights and input to int8 puts on its output channels, measured in one more
            pass over the calibration samples (:mod:`edgeslim.components.quantize.bias`).
        seed: which calibration samples are drawn.
    """

    stage = "quantize"
    method = "ptq"
    is_default = True
    placement: Literal["all", "weighted"] = "all"
    bias_correction: bool = False
    seed: int = 0

    def validate(self) -> None:
        self.check_calibration()


# --- Compression stages: distillation, structural pruning, QAT, accuracy-aware ---

Importance = Literal["l1", "l2", "bn_scale", "taylor"]
Optimizer = Literal["adamw", "adam", "sgd"]
Schedule = Literal["cosine", "onecycle", "step", "constant"]


def _check_training(where: str, epochs: int, lr: float, batch_size: int, min_epochs: int = 0) -> None:
    if epochs < min_epochs:
        raise ConfigError(f"{where}.epochs: got {epochs}; use {min_epochs} or more")
    if not lr > 0:
        raise ConfigError(f"{where}.lr: got {lr}; use a positive learning rate like 1e-3")
    if batch_size < 1:
        raise ConfigError(f"{where}.batch_size: got {batch_size}; use 1 or more (typical 64)")


@dataclasses.dataclass(frozen=True)
class DistilledFinetuning:
    """The fine-tuning settings that pruning and QAT share; each config documents its own defaults."""

    lr: float = 1e-3
    batch_size: int = 64
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.5
    seed: int = 0
    augment: list[Augmentation] = dataclasses.field(default_factory=list)

    def check_finetuning(self, where: str, epochs: int, min_epochs: int = 0) -> None:
        _check_training(where, epochs, self.lr, self.batch_size, min_epochs)
        _check_distill(where, self.temperature, self.alpha)
        _check_augment(where, self.augment)


@dataclasses.dataclass(frozen=True)
class ChannelPruneConfig(DistilledFinetuning, StageConfig):
    """Structural channel pruning that follows layer dependencies (Torch-Pruning).

    Channels are physically removed, together with every channel they are tied
    to through residual adds, concats and depthwise convolutions.

    Attributes:
        target: what ``keep_fraction`` measures: ``macs`` or ``params``.
        keep_fraction: share of the parent's MACs (or parameters) the pruned model
            keeps, in (0, 1); 0.25 means 4x fewer.
        importance: channel ranking: ``l1``/``l2`` weight magnitude, ``bn_scale``
            (|gamma| of the following BatchNorm) or ``taylor`` (|w * dL/dw|).
        global_pruning: rank channels across all layers (True) or remove the same
            share from every layer (False).
        max_layer_ratio: largest share of one layer's channels that may go.
        layer_ratios: per-layer shares to remove, ``{module name or fnmatch pattern: ratio}``;
            those layers lose exactly that share (first, in one shot) and the
            target is then met by pruning the other layers.
        ignored_layers: module names or fnmatch patterns never pruned (heads).
            The output layer is always kept whole.
        round_to: keep channel counts a multiple of this (8 suits TensorRT int8); 1 = any.
        steps: pruning steps; the target is reached gradually, with fine-tuning after each.
        finetune_epochs: fine-tuning epochs after each step (0: none).
        lr: fine-tuning learning rate.
        batch_size: fine-tuning batch size.
        distill: fine-tune with knowledge distillation from the unpruned model.
        temperature: distillation temperature.
        alpha: weight of the distillation loss against the hard-label loss (for a detector:
            distillation of the teacher's class scores and boxes against the detection loss).
        seed: makes the fine-tuning repeatable.
        augment: augmentations of the training batches, in order (``shift``, ``hflip``); none by default.
    """

    stage = "prune"
    method = "channel"
    is_default = True
    target: Literal["macs", "params"] = "macs"
    keep_fraction: float = 0.5
    importance: Importance = "l2"
    global_pruning: bool = False
    max_layer_ratio: float = 0.9
    layer_ratios: dict = dataclasses.field(default_factory=dict)
    ignored_layers: list[str] = dataclasses.field(default_factory=list)
    round_to: int = 1
    steps: int = 1
    finetune_epochs: int = 5
    lr: float = 2e-3
    alpha: float = 0.7

    def validate(self) -> None:
        if not 0.0 < self.keep_fraction < 1.0:
            raise ConfigError(
                f"prune.keep_fraction: got {self.keep_fraction}; use a share of the {self.target} "
                "to keep in (0, 1), e.g. 0.25 for 4x fewer"
            )
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise ConfigError(
                f"prune.max_layer_ratio: got {self.max_layer_ratio}; use a value in (0, 1): "
                "1 would remove every channel of a layer"
            )
        for name, ratio in self.layer_ratios.items():
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise ConfigError(f"prune.layer_ratios.{name}: got {ratio!r}; expected a number in [0, 1)")
            if ratio >= 1.0:
                raise ConfigError(
                    f"prune.layer_ratios.{name}: got {ratio}; that would remove every channel of the "
                    "layer; use a ratio below 1 (or list it in ignored_layers to keep it whole)"
                )
            if ratio < 0.0:
                raise ConfigError(f"prune.layer_ratios.{name}: got {ratio}; use a ratio in [0, 1)")
        if self.round_to < 1:
            raise ConfigError(f"prune.round_to: got {self.round_to}; use 1 (any count) or more")
        if self.steps < 1:
            raise ConfigError(f"prune.steps: got {self.steps}; use 1 or more")
        self.check_finetuning("prune", self.finetune_epochs)


def _check_distill(where: str, temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"{where}.temperature: got {temperature}; use a positive temperature like 4")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"{where}.alpha: got {alpha}; use a weight in [0, 1] (1: distillation loss only, "
            "0: hard labels only)"
        )


@dataclasses.dataclass(frozen=True)
class LogitDistillConfig(StageConfig):
    """Knowledge distillation on the logits: KL at temperature T blended with hard labels.

    loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)

    Attributes:
        student: where the student comes from: ``previous`` (the model the
            previous stage produced; the teacher itself when distill is first),
            ``width`` (the teacher's architecture at ``width`` channels, built by
            structural pruning) or ``uri`` (a registered model, ``student_uri``).
        width: channel multiplier for ``student: width``, in (0, 1).
        student_uri: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` for ``student: uri``.
        temperature: softening temperature T.
        alpha: weight of the distillation loss (1 - alpha goes to the hard labels).
        epochs: training epochs.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (momentum 0.9, nesterov).
        lr: peak learning rate.
        weight_decay: decoupled (adamw) or L2 weight decay.
        schedule: learning-rate schedule over all steps: ``cosine``, ``onecycle``,
            ``step`` (x0.1 at 1/2 and 3/4) or ``constant``.
        batch_size: training batch size.
        seed: makes the run repeatable (init of adapters, shuffling, augmentation).
        augment: augmentations of the training batches, in order (``shift``, ``hflip``); none by default.
    """

    stage = "distill"
    method = "logit"
    is_default = True
    student: Literal["previous", "width", "uri"] = "width"
    width: float = 0.5
    student_uri: str = ""
    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int = 20
    optimizer: Optimizer = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: Schedule = "onecycle"
    batch_size: int = 64
    seed: int = 0
    augment: list[Augmentation] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        where = f"distill({self.method})"
        _check_augment(where, self.augment)
        if self.student == "width" and not 0.0 < self.width < 1.0:
            raise ConfigError(
                f"{where}.width: got {self.width}; use a channel multiplier in (0, 1), e.g. 0.5"
            )
        if self.student == "uri":
            import re

            if not re.match(r"^models:/[^/@]+(@[\w.-]+|/\d+)$", self.student_uri):
                raise ConfigError(
                    f"{where}.student_uri: got {self.student_uri!r}; with student: uri give "
                    "'models:/NAME@ALIAS' or 'models:/NAME/VERSION'"
                )
        elif self.student_uri:
            raise ConfigError(
                f"{where}.student_uri: set, but student is {self.student!r}; set student: uri "
                "or drop student_uri"
            )
        _check_distill(where, self.temperature, self.alpha)
        _check_training(where, self.epochs, self.lr, self.batch_size, min_epochs=1)
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay: got {self.weight_decay}; use 0 or more")


@dataclasses.dataclass(frozen=True)
class FeatureDistillConfig(LogitDistillConfig):
    """Logit distillation plus feature distillation on named layer pairs.

    Each pair ``[teacher_layer, student_layer]`` names modules (as in
    ``model.named_modules()``); the student's feature map goes through a learned
    1x1 adapter when the channel counts differ, and its MSE to the teacher's
    feature map is added to the loss with weight ``feature_weight``.

    Attributes:
        layer_pairs: ``[[teacher module, student module], ...]``; at least one.
        feature_weight: weight of the summed feature losses.
    """

    method = "feature"
    layer_pairs: list[list[str]] = dataclasses.field(default_factory=list)
    feature_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.layer_pairs:
            raise ConfigError(
                "distill(feature).layer_pairs: empty; give pairs like [[features.11, features.11]] "
                "or use method: logit"
            )
        for i, pair in enumerate(self.layer_pairs):
            if len(pair) != 2 or not all(pair):
                raise ConfigError(
                    f"distill(feature).layer_pairs[{i}]: got {pair!r}; each pair is "
                    "[teacher module name, student module name]"
                )
        if self.feature_weight < 0:
            raise ConfigError(f"distill(feature).feature_weight: got {self.feature_weight}; use 0 or more")


@dataclasses.dataclass(frozen=True)
class QATQuantizeConfig(OneCalibrator, DistilledFinetuning, StageConfig):
    """Quantization-aware training into the same symmetric per-channel Q/DQ ONNX as PTQ.

    Fake quantization starts from the ranges PTQ calibration picks, then the
    weights train for ``epochs`` with the quantization in the loop; the ranges
    are calibrated again on the trained weights for the export.

    Attributes:
        calibrator: the PTQ calibrator that initialises the activation ranges.
        num_samples: calibration samples (train split only).
        percentile: for the ``percentile`` calibrator.
        num_bins: histogram bins for ``entropy``/``mse``/``percentile`` (at least; see ``PTQQuantizeConfig``).
        float_layers: node names or fnmatch patterns kept in float.
        epochs: fine-tuning epochs with fake quantization (1 or more).
        lr: fine-tuning learning rate (small: the model is already trained).
        batch_size: fine-tuning batch size.
        distill: distil from the fp32 parent while fine-tuning.
        temperature: distillation temperature.
        alpha: weight of the distillation loss.
        seed: calibration draw and fine-tuning order.
        augment: augmentations of the training batches, in order (``shift``, ``hflip``); none by default.
        placement: where Q/DQ pairs go, ``all`` or ``weighted`` (as ``quantize.placement`` of
            ``method: ptq``); the fake quantizers follow the Q/DQ graph.
    """

    stage = "quantize"
    method = "qat"
    epochs: int = 3
    lr: float = 1e-4
    placement: Literal["all", "weighted"] = "all"

    def validate(self) -> None:
        self.check_calibration()
        self.check_finetuning("quantize(qat)", self.epochs, min_epochs=1)

    def ptq(self) -> PTQQuantizeConfig:
        """The PTQ config whose calibration initialises the fake quantizers."""
        return PTQQuantizeConfig(**self.calibration(), placement=self.placement, seed=self.seed)


@dataclasses.dataclass(frozen=True)
class AccuracyAwareQuantizeConfig(Calibration, StageConfig):
    """Try PTQ per calibrator, then float fallback of the most sensitive layers, then QAT;
    stop at the first candidate that passes the gate.

    Attributes:
        calibrators: PTQ calibrators tried in this order, names in :data:`CALIBRATORS`.
        num_samples: calibration samples (train split only).
        percentile: for the ``percentile`` calibrator.
        num_bins: histogram bins for ``entropy``/``mse``/``percentile`` (at least; see ``PTQQuantizeConfig``).
        max_float_layers: how many of the most sensitive layers may be kept in
            float, one more per trial (0: no fallback).
        sensitivity_metric: how layers are ranked: by the metric drop when only that
            layer is quantized (``drop``, ties broken by SQNR) or by that SQNR (``sqnr``).
        float_layers: node names or fnmatch patterns kept in float in every trial
            (as ``quantize.float_layers`` of ``method: ptq``); the fallback adds to them.
        placement: ``all`` or ``weighted`` (as ``quantize.placement`` of ``method: ptq``), or
            ``auto`` (the default): each calibrator tries ``all`` and then, when that fails the gate,
            ``weighted`` on the same ranges (one more quantize and judgement, no calibration); the
            fallback and QAT keep the best trial's placement.
        select: which PTQ trial is returned when several would pass. ``first`` (the default): the
            first that passes the gate, in the order above (the cheapest search). ``best``: every
            calibrator's PTQ trials are judged, and of those that pass, the one the task ranks best on
            the validation split (for a detector: the least mAP@0.5:0.95 and mAP@0.5 lost, then the
            highest output SQNR) is returned; each further trial costs one quantize and one judgement.
        bias_correction: PTQ trials correct their biases (as ``quantize.bias_correction`` of
            ``method: ptq``).
        qat: run QAT when PTQ and fallback all fail.
        qat_epochs: QAT fine-tuning epochs.
        qat_lr: QAT learning rate.
        seed: calibration draw and QAT order.
        augment: augmentations of QAT's training batches (``shift``, ``hflip``); none by default.
    """

    stage = "quantize"
    method = "auto"
    calibrators: list[str] = dataclasses.field(
        default_factory=lambda: ["percentile", "entropy", "mse", "minmax"])
    max_float_layers: int = 3
    sensitivity_metric: Literal["drop", "sqnr"] = "drop"
    placement: Literal["auto", "all", "weighted"] = "auto"
    select: Literal["first", "best"] = "first"
    bias_correction: bool = False
    qat: bool = True
    qat_epochs: int = 3
    qat_lr: float = 1e-4
    seed: int = 0
    augment: list[Augmentation] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        _check_augment("quantize(auto)", self.augment)
        if not self.calibrators:
            raise ConfigError(
                f"quantize(auto).calibrators: empty; list at least one of {', '.join(CALIBRATORS.names())}"
            )
        for i, name in enumerate(self.calibrators):
            _check_calibrator(f"quantize.calibrators[{i}]", name)
        if len(set(self.calibrators)) != len(self.calibrators):
            raise ConfigError(f"quantize(auto).calibrators: {self.calibrators} repeats a calibrator; list each once")
        if self.max_float_layers < 0:
            raise ConfigError(f"quantize(auto).max_float_layers: got {self.max_float_layers}; use 0 or more")
        self.check_calibration()
        _check_training("quantize(auto).qat", self.qat_epochs, self.qat_lr, 1, min_epochs=1)

    @property
    def placements(self) -> list[str]:
        """The Q/DQ placements each calibrator's PTQ trial tries, in order."""
        return ["all", "weighted"] if self.placement == "auto" else [self.placement]

    def ptq(self, calibrator: str, float_layers: list[str] | None = None,
            placement: str | None = None) -> PTQQuantizeConfig:
        """PTQ with ``calibrator``, the pinned float layers plus ``float_layers``, and ``placement``
        (default: the first of :attr:`placements`)."""
        pinned_and_trial = list(dict.fromkeys(self.float_layers + list(float_layers or [])))
        return PTQQuantizeConfig(**self.calibration(float_layers=pinned_and_trial), calibrator=calibrator,
                                 placement=placement or self.placements[0], seed=self.seed,  # type: ignore[arg-type]
                                 bias_correction=self.bias_correction)

    def qat_config(self, calibrator: str, float_layers: list[str], **overrides) -> "QATQuantizeConfig":
        """The search's last trial as ``method: qat``: QAT from ``calibrator``'s ranges with ``float_layers``
        kept in float (the trial's, pinned ones included), trained ``qat_epochs`` at ``qat_lr``."""
        return QATQuantizeConfig(**self.calibration(float_layers=list(float_layers)), calibrator=calibrator,
                                 epochs=self.qat_epochs, lr=self.qat_lr,
                                 seed=self.seed, augment=list(self.augment), placement=self.placements[0],
                                 **overrides)
