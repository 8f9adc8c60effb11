"""The one quantize verb: ``quantize(fp32_onnx, config, ...)``, where the method is the config's ``method``.

Each method is a function registered under its name in the entry-point group ``edgeslim.quantize_methods``
(:data:`QUANTIZE_METHODS`), taking what :func:`quantize` takes::

    method(fp32_onnx, config, *, data, out_dir, model, strategy, export_config, tracking_uri,
           parent_run_id, progress) -> StageResult

and refusing in one line (``ConfigError``) what it cannot run without. The built-in ones:

- ``ptq`` (``PTQQuantizeConfig``): calibrate and quantize (:mod:`.ptq`), the same for every task;
- ``qat`` (``QATQuantizeConfig``): fake-quantized fine-tuning of the torch model, exported again: the one QAT
  chain (:func:`.qat.qat_chain`) with the task's fake-quant twin and loss (the strategy's ``train_qat``;
  a classifier's when no strategy is given);
- ``auto`` (``AccuracyAwareQuantizeConfig``): the accuracy-aware search (:mod:`.search`), judged and ranked
  by the task's strategy (the Task gives it: ``ClassifierStrategy`` or ``DetectorStrategy``, or your own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.registry import Registry
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import OnnxExportConfig

QUANTIZE_METHODS: Registry[Callable[..., StageResult]] = Registry("edgeslim.quantize_methods", "quantize method",
                                                                  where="quantize")


def quantize(fp32_onnx: str | Path, config, *, data: Splits, out_dir: str | Path, model=None,
             strategy=None, export_config: OnnxExportConfig | None = None, tracking_uri: str | None = None,
             parent_run_id: str | None = None, progress: Callable[[str], None] | None = None) -> StageResult:
    """Quantize ``fp32_onnx`` to a symmetric per-channel int8 Q/DQ ONNX with the method ``config`` names.

    Args:
        fp32_onnx: the fp32 ONNX to quantize.
        config: a quantize stage's config: ``PTQQuantizeConfig``, ``QATQuantizeConfig``,
            ``AccuracyAwareQuantizeConfig`` or the config of a method you register.
        data: calibration and training from train; the search judges on val.
        out_dir: where the Q/DQ ONNX (and the search's trials) go.
        model: the torch model ``fp32_onnx`` was exported from (QAT trains it).
        strategy: the task's :class:`.search.Strategy`: it judges the search's trials and trains QAT.
        export_config: ONNX export settings for QAT's export.
        tracking_uri, parent_run_id: the search's trials become child runs of this MLflow run.
        progress: called with one line per search trial.

    Raises:
        ConfigError: a config that is no quantize method's, or a method without what it needs (QAT without
            a model, the search without a strategy).
        GateRejected: the search found no candidate that passes.
    """
    method = getattr(config, "method", "?")
    if getattr(config, "stage", None) != "quantize":
        raise ConfigError(f"quantize: method {method!r} is not a quantize method; "
                          f"use {', '.join(QUANTIZE_METHODS.names())}")
    run = QUANTIZE_METHODS.get(method)
    return run(fp32_onnx, config, data=data, out_dir=out_dir, model=model, strategy=strategy,
               export_config=export_config, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
               progress=progress)


def ptq(fp32_onnx, config, *, data, out_dir, **_unused) -> StageResult:
    """``method: ptq``: calibrate on train and quantize."""
    from edgeslim.components.quantize.ptq import quantize as ptq_quantize

    return ptq_quantize(fp32_onnx, config, data=data, out_dir=out_dir)


def qat(fp32_onnx, config, *, data, out_dir, model, strategy, export_config, **_unused) -> StageResult:
    """``method: qat``: the task's QAT chain (the strategy's ``train_qat``), or a classifier's on ``model``."""
    if (model if strategy is None else getattr(strategy, "model", None)) is None:
        raise ConfigError("quantize(qat): QAT trains the torch model; pass the model the ONNX was exported from")
    if strategy is not None:  # the task's twin and loss in the one QAT chain
        return strategy.train_qat(fp32_onnx, config, data=data, out_dir=Path(out_dir))
    from edgeslim.components.quantize.qat import qat as qat_train

    return qat_train(model, config, data=data, out_dir=out_dir, fp32_onnx=fp32_onnx, export_config=export_config)


def auto(fp32_onnx, config, *, data, out_dir, strategy, tracking_uri, parent_run_id, progress,
         **_unused) -> StageResult:
    """``method: auto``: the accuracy-aware search, judged by the task's strategy."""
    if strategy is None:
        raise ConfigError("quantize(auto): the search needs the task's strategy (Task.search_strategy)")
    from edgeslim.components.quantize.search import search

    return search(fp32_onnx, config, strategy=strategy, data=data, out_dir=out_dir, tracking_uri=tracking_uri,
                  parent_run_id=parent_run_id, progress=progress)
