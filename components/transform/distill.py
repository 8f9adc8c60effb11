"""Knowledge distillation: logit KD and feature KD (the loop is :func:`.train.fit`).

``distill(model, config, *, data, teacher)`` trains a student to imitate the
teacher. The student is the previous stage's output, the teacher's own
architecture at a width multiplier (built by structural pruning), or another
registered model.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError, SourceError
from edgeslim.components.common.accuracy import top1
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import FeatureDistillConfig, LogitDistillConfig
from edgeslim.components.transform.train import Progress, TrainConfig, augmentation, fit

def check_output_shape(student: nn.Module, teacher: nn.Module, example: torch.Tensor,
                       what: str) -> None:
    """Refuse a student whose output shape is not the teacher's (KD needs the same outputs)."""
    with torch.no_grad():
        s = student.eval()(example)
        t = teacher.eval()(example)
    if not isinstance(s, torch.Tensor) or s.shape != t.shape:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ConfigError(
            f"distill: the student ({what}) outputs shape {got} but the teacher outputs "
            f"{tuple(t.shape)}; pick a student with the teacher's outputs (same number of classes)"
        )


def load_registered_student(uri: str) -> nn.Module:
    """Load a registered PyTorch model from MLflow (the tracking URI comes from the environment)."""
    import mlflow

    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:  # mlflow raises many types; the user needs the URI and the reason
        raise SourceError(
            f"distill.student_uri {uri}: cannot load it ({type(exc).__name__}: {str(exc)[:160]}); "
            "check the name/alias and MLFLOW_TRACKING_URI, and that it was logged with "
            "mlflow.pytorch.log_model(..., serialization_format='pickle')"
        ) from None
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise SourceError(
            f"distill.student_uri {uri}: loaded a {type(model).__name__}, not a trainable module; "
            "log it with mlflow.pytorch.log_model(..., serialization_format='pickle')"
        )
    return model


def build_student(model: nn.Module, config: LogitDistillConfig, *, teacher: nn.Module,
                  example: torch.Tensor) -> tuple[nn.Module, str]:
    """The student the config asks for, as a fresh copy, and a short description of it."""
    if config.student == "uri":
        return load_registered_student(config.student_uri), config.student_uri
    if config.student == "width":
        from edgeslim.components.transform.prune import shrink_to_width

        return shrink_to_width(teacher, config.width, example=example), f"teacher@width{config.width:g}"
    return copy.deepcopy(model), "previous stage"


def distill(model: nn.Module, config: LogitDistillConfig, *, data: Splits, teacher: nn.Module,
            progress: Progress | None = None) -> StageResult:
    """Train a student to imitate ``teacher``; neither input is changed.

    Args:
        model: the previous stage's output (the student when ``config.student`` is ``previous``).
        config: a ``LogitDistillConfig`` or ``FeatureDistillConfig``.
        data: the splits; training uses ``train``, metrics ``val`` and ``test``.
        teacher: the fp32 model distilled from.
        progress: called with (epoch, epochs, loss).

    Returns:
        StageResult with the trained student, top-1 of student and teacher,
        parameter and MAC counts.

    Raises:
        ConfigError: a feature-KD layer is missing, or the student's output shape
            differs from the teacher's.
        SourceError: a student URI cannot be loaded.
    """
    start = time.perf_counter()
    example = torch.from_numpy(data.x_train[:2])
    teacher = copy.deepcopy(teacher).eval()
    student, what = build_student(model, config, teacher=teacher, example=example)
    check_output_shape(student, teacher, example, what)
    from edgeslim.components.transform.prune import count_macs_params

    before = top1(student, data.x_val, data.y_val)
    pairs = config.layer_pairs if isinstance(config, FeatureDistillConfig) else None
    fit(student, TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                             optimizer=config.optimizer, schedule=config.schedule,
                             weight_decay=config.weight_decay, temperature=config.temperature,
                             alpha=config.alpha, seed=config.seed, feature_pairs=pairs,
                             feature_weight=getattr(config, "feature_weight", 0.0),
                             augment=augmentation(config.augment)),
        x=data.x_train, y=data.y_train, teacher=teacher, progress=progress)
    macs, params = count_macs_params(student, example[:1])
    t_macs, t_params = count_macs_params(teacher, example[:1])
    metrics = {
        "student_top1_val_before": before,
        "student_top1_val": top1(student, data.x_val, data.y_val),
        "student_top1_test": top1(student, data.x_test, data.y_test),
        "teacher_top1_test": top1(teacher, data.x_test, data.y_test),
        "student_macs": macs, "student_params": params,
        "teacher_macs": t_macs, "teacher_params": t_params,
    }
    lineage = {"stage": "distill", "config": config.to_json_dict(), "student": what,
               "data_digest": data.digest()}
    return StageResult(student, metrics, lineage, time.perf_counter() - start)
