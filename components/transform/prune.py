"""Structural channel pruning with Torch-Pruning's dependency graph.

Channels are removed from the weights, not masked: every layer tied to a pruned
channel (the BatchNorm after it, the next layer's inputs, the other side of a
residual add, the slice of a concat, a depthwise conv's groups) shrinks with it,
so the pruned model really has fewer MACs and runs faster.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgeslim.components.common.data import Splits
from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.accuracy import top1
from edgeslim.components.common.result import StageResult
from edgeslim.components.common.stage_configs import ChannelPruneConfig

Progress = Callable[[int, int, float], None]
# Small increments let the pruner stop close to a MACs/params target.
_INCREMENTS = 40


def _tp():
    import torch_pruning as tp  # a required dependency; imported late to keep `import edgeslim` light

    return tp


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs of one forward pass on ``example`` (batch 1 gives per-sample MACs) and parameters."""
    macs, params = _tp().utils.count_ops_and_params(model.eval(), example)
    return int(macs), int(params)


def _importance(name: str):
    imp = _tp().importance
    if name == "l1":
        return imp.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return imp.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return imp.BNScaleImportance()
    return imp.GroupTaylorImportance()


def _prunable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) and n}


def layer_outputs(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Run ``model`` once (eval, no gradients): each conv/linear layer's output by name, and the model's
    outputs as a list (a tuple, list or dict of outputs, or a single tensor)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o))
               for n, m in _prunable(model).items()]
    try:
        with torch.no_grad():
            out = model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    outs = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]
    return seen, outs


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the layers whose output channels are the model's outputs (heads).

    Found by running the model with a hook on every conv/linear: a head's output
    tensor is the model's output (or has its trailing size).
    """
    seen, outs = layer_outputs(model, example)
    heads = [n for n, t in seen.items() if any(t is o for o in outs)]
    if not heads:  # the head is followed by a reshape/activation: fall back to the last layer
        heads = [list(seen)[-1]]
    return heads


def _match(model: nn.Module, patterns: list[str], key: str) -> dict[str, list[str]]:
    """Module names each pattern matches; a pattern that matches nothing is an error."""
    names = [n for n, _ in model.named_modules() if n]
    out = {}
    for pat in patterns:
        hit = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hit:
            import difflib

            close = difflib.get_close_matches(pat, names, n=3, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else f"layers: {', '.join(names[:12])}"
            raise ConfigError(f"prune.{key}: no layer matches {pat!r}; {hint}")
        out[pat] = hit
    return out


def _channels(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if hasattr(m, "out_channels") else m.out_features)
            for n, m in _prunable(model).items()}


def _measure(model: nn.Module, example: torch.Tensor, target: str) -> int:
    macs, params = count_macs_params(model, example)
    return macs if target == "macs" else params


def _taylor_grads(model: nn.Module, data: Splits, seed: int, n: int = 256) -> None:
    """Taylor importance reads weight gradients: fill them from a batch of training loss."""
    idx = np.random.default_rng(seed).choice(len(data.x_train), size=min(n, len(data.x_train)),
                                             replace=False)
    model.eval()
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(torch.from_numpy(data.x_train[idx])),
                                       torch.from_numpy(data.y_train[idx]).long())
    loss.backward()


def _pruner(model: nn.Module, config: ChannelPruneConfig, example: torch.Tensor,
            ignored: list[str], ratio_dict: dict[str, float], max_ratio: float, steps: int):
    tp = _tp()
    modules = dict(model.named_modules())
    with warnings.catch_warnings():
        # Layer-scale gammas, class tokens and position embeddings are parameters outside any layer;
        # Torch-Pruning prunes their last non-singleton axis (the channel axis of all three) and warns
        # each time: the lineage lists them instead (unwrapped_parameters).
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.pruner.MetaPruner(
            model, example, importance=_importance(config.importance),
            global_pruning=config.global_pruning, pruning_ratio=max_ratio,
            pruning_ratio_dict={modules[n]: r for n, r in ratio_dict.items()} or None,
            max_pruning_ratio=max_ratio, iterative_steps=steps,
            ignored_layers=[modules[n] for n in ignored],
            round_to=config.round_to if config.round_to > 1 else None,
            # Fresh dicts: MetaPruner's defaults are shared between calls and it writes every grouped
            # layer into them, which would keep each pruned copy (and its weights) alive.
            in_channel_groups={}, out_channel_groups={}, num_heads={}, channel_groups={},
        )


def unwrapped_parameters(pruner) -> dict[str, int]:
    """Parameters outside any layer that the pruner shrinks with their channels, and along which axis."""
    names = pruner.DG._param_to_name
    return {names.get(p, "?"): int(dim) for p, dim in pruner.DG.unwrapped_parameters}


# The output projection of an attention module, by the names timm, Hugging Face and torch use.
_ATTENTION_OUTPUTS = ("proj", "out_proj", "o_proj", "to_out", "out", "dense")


def attention_inputs(model: nn.Module) -> dict[str, list[str]]:
    """The query/key/value projections of every multi-head attention, by attention module.

    An attention module is one with an integer ``num_heads`` (timm's ``Attention``, Swin's
    ``WindowAttention``, most hand-written ones) or a ``nn.MultiheadAttention``. Its input
    projections' output channels are laid out head by head (``num_heads x head_dim``, times 3
    for a fused ``qkv``) and the forward reshapes them with the module's own ``num_heads`` and
    ``head_dim``: pruning them channel by channel breaks that reshape. They are kept whole, so
    heads and head dims stay as they are while the embedding width and the MLPs are pruned; the
    output projection stays prunable on its output side (the embedding). A module whose output
    projection is not recognised is kept whole altogether.
    """
    found: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            found[name] = [name]
            continue
        heads = getattr(mod, "num_heads", None)
        if not name or isinstance(heads, bool) or not isinstance(heads, int):
            continue
        # the projections are the module's own layers (a block or model that merely records
        # num_heads holds its layers deeper down, and is not an attention)
        layers = [n for n, m in mod.named_children() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        if not layers:
            continue
        outputs = {n for n in layers if n in _ATTENTION_OUTPUTS}
        found[name] = [f"{name}.{n}" for n in layers if n not in outputs] if outputs else [name]
    return found


def kept_whole(model: nn.Module, example: torch.Tensor) -> tuple[list[str], list[str]]:
    """The layers every pruning keeps whole: the output layers, and the attention inputs."""
    heads = output_layers(model, example)
    attention = sorted({n for names in attention_inputs(model).values() for n in names} - set(heads))
    return heads, attention


def _plan(model: nn.Module, config: ChannelPruneConfig, example: torch.Tensor
          ) -> tuple[list[str], dict[str, float], list[str]]:
    heads, attention = kept_whole(model, example)
    ignored = set(heads) | set(attention)
    for hits in _match(model, config.ignored_layers, "ignored_layers").values():
        ignored.update(hits)
    ratios: dict[str, float] = {}
    for pat, hits in _match(model, list(config.layer_ratios), "layer_ratios").items():
        for n in hits:
            if n in heads:
                raise ConfigError(
                    f"prune.layer_ratios.{pat}: {n} is an output layer; pruning it would change "
                    "the model's outputs; remove it from layer_ratios"
                )
            if n in attention or any(n.startswith(a + ".") for a in attention):
                raise ConfigError(
                    f"prune.layer_ratios.{pat}: {n} projects an attention's queries/keys/values, whose "
                    "channels are laid out head by head; they are kept whole; remove it from "
                    "layer_ratios (the embedding width and the MLPs are pruned)"
                )
            ratios[n] = float(config.layer_ratios[pat])
    return sorted(ignored), ratios, attention


def _prune_to(model: nn.Module, pruner, config: ChannelPruneConfig, example: torch.Tensor,
              goal: float, data: Splits, start: int | None = None) -> int:
    """Step the pruner until the measured size is at most ``goal``; return the size.

    ``start`` is the size the model had when ``pruner`` was made. Given it, the pruner first jumps
    to a share of channels that cannot overshoot the goal: removing a share r of every layer's
    channels leaves at least (1 - r)^2 of the MACs and parameters (a layer loses at most r of its
    inputs and r of its outputs; kept-whole layers lose less), so at r = 1 - sqrt(goal / start) the
    model is still at or above the goal. It jumps to 0.8 of that share (a layer keeps a whole number
    of channels, rounded down), or half of it where channels are allotted unevenly (global pruning
    can cut the heaviest layers harder) or rounded to ``round_to``; small steps take it the rest of
    the way. A 224x224 model is then measured a handful of times rather than once per small step.
    """
    size = _measure(model, example, config.target) if start is None or pruner.current_step else start
    if start and size > goal:
        share = (1.0 - math.sqrt(goal / start)) * (0.5 if config.global_pruning or config.round_to > 1 else 0.8)
        jump = min(int(share / pruner.max_pruning_ratio * pruner.iterative_steps), pruner.iterative_steps) - 1
        if jump > pruner.current_step:
            pruner.current_step = jump  # step() prunes to the absolute share of step current_step + 1
    while size > goal and pruner.current_step < pruner.iterative_steps:
        if config.importance == "taylor":
            _taylor_grads(model, data, config.seed + pruner.current_step)
        pruner.step()
        size = _measure(model, example, config.target)
    model.zero_grad(set_to_none=True)
    return size


def _others(model: nn.Module, keep: set[str]) -> list[str]:
    return [n for n in _prunable(model) if n not in keep]


def _check_reachable(model: nn.Module, config: ChannelPruneConfig, example: torch.Tensor,
                     ignored: list[str], base: int, data: Splits) -> None:
    """Refuse a target that could only be met by emptying layers, before any training: a copy
    pruned by ``max_layer_ratio`` in one shot is the smallest the pruner can make the model."""
    trial = copy.deepcopy(model)
    pruner = _pruner(trial, config, example, ignored, {}, config.max_layer_ratio, 1)
    if config.importance == "taylor":
        _taylor_grads(trial, data, config.seed)
    pruner.step()
    floor = _measure(trial, example, config.target)
    del trial
    if floor > config.keep_fraction * base * 1.02:
        reach = floor / base
        raise ConfigError(
            f"prune.keep_fraction: {config.keep_fraction} of the {config.target} is out of reach: "
            f"removing {config.max_layer_ratio:.0%} of every prunable layer's channels "
            f"(max_layer_ratio) keeps {reach:.3f}; going lower would remove every channel of a "
            f"layer. Use keep_fraction >= {math.ceil(reach * 1000) / 1000:.3f}, or raise "
            "max_layer_ratio (below 1), or un-ignore layers"
        )


class FlatOutputs(nn.Module):
    """A model with any outputs (a detector's maps, a segmenter's logits), its outputs flattened and joined into
    one ``(N, K)`` tensor: what :func:`prune` takes. The model is ``.m``: its layers' names gain ``m.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from edgeslim.components.common.model_outputs import tensor_outputs

        return torch.cat([o.flatten(1) for o in tensor_outputs(self.m(x))], 1)


def prune(model: nn.Module, config: ChannelPruneConfig, *, data: Splits,
          teacher: nn.Module | None = None, progress: Progress | None = None) -> StageResult:
    """Remove channels until the model keeps ``config.keep_fraction`` of its MACs or params.

    The target is reached in ``config.steps`` geometric steps with fine-tuning
    (distilled from the unpruned model when ``config.distill``) after each.
    ``model`` is not changed.

    Args:
        model: the model to prune.
        config: pruning settings.
        data: training data for fine-tuning and Taylor importance; metrics on val/test.
        teacher: distilled from while fine-tuning; defaults to the unpruned ``model``.
        progress: called with (epoch, epochs, the epoch's mean loss) after each fine-tuning epoch,
            counted over all ``config.steps`` steps; without fine-tuning, with (step, steps, nan)
            after each step.

    Returns:
        StageResult with the pruned model; metrics hold MACs and params before
        and after, their ratios, top-1 before/after and channels per layer.

    Raises:
        ConfigError: a pattern matches no layer, or the target would empty a layer.
    """
    from edgeslim.components.transform.train import TrainConfig, augmentation, fit

    start = time.perf_counter()
    work = copy.deepcopy(model).eval()
    example = torch.from_numpy(data.x_train[:1])
    macs0, params0 = count_macs_params(work, example)
    base = macs0 if config.target == "macs" else params0
    channels0 = _channels(work)
    ignored, ratios, attention = _plan(work, config, example)
    if ratios:
        # Layers with their own ratio lose exactly that share first, in one shot;
        # the MACs/params target is then met by the other layers.
        fixed = _pruner(work, config, example, _others(work, set(ratios)), ratios,
                        max(ratios.values()), 1)
        fixed.step()
        ignored = sorted(set(ignored) | set(ratios))
    _check_reachable(work, config, example, ignored, base, data)

    kd_teacher = copy.deepcopy(teacher if teacher is not None else model).eval() if config.distill else None
    top1_before = top1(work, data.x_val, data.y_val)
    pruner = _pruner(work, config, example, ignored, {}, config.max_layer_ratio, _INCREMENTS)
    unwrapped = unwrapped_parameters(pruner)  # by name before pruning replaces the parameters
    start_size = _measure(work, example, config.target)
    history = []
    for step in range(1, config.steps + 1):
        goal = base * config.keep_fraction ** (step / config.steps)
        size = _prune_to(work, pruner, config, example, goal, data, start=start_size)
        pruned_top1 = top1(work, data.x_val, data.y_val)
        if config.finetune_epochs:
            done = (step - 1) * config.finetune_epochs
            fit(work, TrainConfig(epochs=config.finetune_epochs, lr=config.lr, batch_size=config.batch_size,
                                  temperature=config.temperature, alpha=config.alpha, seed=config.seed + step,
                                  schedule="onecycle", augment=augmentation(config.augment),
                                  recalibrate_batchnorm=True),
                x=data.x_train, y=data.y_train, teacher=kd_teacher,
                progress=lambda e, n, l, done=done: progress and progress(done + e, n * config.steps, l))
        elif progress:
            progress(step, config.steps, float("nan"))
        history.append({"step": step, "size": size, "goal": goal, "top1_val_pruned": pruned_top1,
                        "top1_val_finetuned": top1(work, data.x_val, data.y_val)})

    macs1, params1 = count_macs_params(work, example)
    channels1 = _channels(work)
    metrics = {
        "macs_before": macs0, "macs_after": macs1, "macs_ratio": macs0 / max(macs1, 1),
        "params_before": params0, "params_after": params1,
        "params_ratio": params0 / max(params1, 1),
        "top1_val_before": top1_before, "top1_val": top1(work, data.x_val, data.y_val),
        "top1_test": top1(work, data.x_test, data.y_test),
        "channels": {n: [channels0[n], channels1.get(n, 0)] for n in channels0},
        "steps": history,
    }
    lineage = {"stage": "prune", "config": config.to_json_dict(), "ignored_layers": ignored,
               # kept whole because their channels are laid out head by head (attention_inputs)
               "attention_inputs_kept": attention,
               "unwrapped_parameters": unwrapped,
               "distilled_from": "unpruned model" if config.distill else None,
               "data_digest": data.digest()}
    return StageResult(work, metrics, lineage, time.perf_counter() - start)


def shrink_to_width(model: nn.Module, width: float, *, example: torch.Tensor,
                    importance: str = "l2") -> nn.Module:
    """The model's own architecture with ``width`` of its channels in every layer.

    Built by one-shot structural pruning of a copy (keeping the channels with the
    largest weights, a better start than random init); the output layer keeps
    its size, and attention keeps its heads (:func:`attention_inputs`). ``model`` is not changed.

    Raises:
        ConfigError: ``width`` is not in (0, 1).
    """
    if not 0.0 < width < 1.0:
        raise ConfigError(f"width multiplier: got {width}; use a value in (0, 1), e.g. 0.5")
    work = copy.deepcopy(model).eval()
    example = example[:1]
    cfg = ChannelPruneConfig(importance=importance, finetune_epochs=0)  # type: ignore[arg-type]
    heads, attention = kept_whole(work, example)
    pruner = _pruner(work, cfg, example, heads + attention, {}, 1.0 - width, 1)
    pruner.step()
    return work.eval()
