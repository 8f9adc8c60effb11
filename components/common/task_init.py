"""Pieces of the recipes ``edgeslim init`` writes for the tasks that search int8 (``quantize: auto``): the
opening lines, the start of the auto quantize stage, the evaluate and register sections, and the model's
outputs on a few validation images, which the task reads its output layout from.

The text returned keeps ``{source}``, ``{output}``, ``{data}`` and ``{edge_name}`` as ``str.format`` fields
(and ``{{}}`` for a literal ``{}``): a task joins the pieces with its own sections into one template and
formats it once."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


def recipe_opening(model: str, labels: str, see_also: str = "") -> str:
    """The header naming the ``model`` kind ("detector"), the source, and the data section under ``labels``
    (comment lines saying what the y arrays hold); ``see_also`` follows the reference's name on the third
    line."""
    return (f"# edgeslim recipe for the {model} {{source}}\n"
            "# Written by `edgeslim init`; run it with `edgeslim run {output}`.\n"
            f"# Every key is documented in the recipe reference (docs/recipe-reference.md){see_also}.\n"
            "version: 1\n\nsource: {source}\n\n"
            f"{labels}\ndata:\n{{data}}\n\n")


def auto_quantize_stages(fallback: str, num_samples: int) -> str:
    """``stages:`` with the export and the first keys of ``quantize: auto``: every calibrator, ``num_samples``
    calibration images, at most three float groups; ``fallback`` says what the search keeps in float."""
    return ("stages:\n"
            "  - export: {{}}                     # opset: the highest every class in engines.device_classes parses\n"
            "  - quantize:\n"
            f"      method: auto                   # {fallback}\n"
            "      calibrators: [percentile, entropy, mse, minmax]\n"
            f"      num_samples: {num_samples}\n"
            "      max_float_layers: 3\n")


def recipe_closing(latency_batches: str = "[1, 8]", warmup: int = 3, repeats: int = 10) -> str:
    """The evaluate section (the latency runs) and the register section naming the edge model."""
    return (f"\nevaluate:\n  latency_batches: {latency_batches}\n  latency_warmup: {warmup}\n"
            f"  latency_repeats: {repeats}\n\n"
            'register:\n  name: "{edge_name}"\n  alias: edge-candidate\n  experiment: edgeslim\n')


class Probe(NamedTuple):
    """The model in eval mode and its outputs (torch tensors) on ``images``, with the outputs' ONNX names
    and shapes."""

    images: Any
    model: Any
    outputs: list
    names: list[str]
    shapes: list[list[int]]

    def described(self) -> str:
        """``name [shape], ...``: how the recipe's comment and init's errors name the outputs."""
        return ", ".join(f"{n} {s}" for n, s in zip(self.names, self.shapes))

    def fields(self) -> dict[str, str]:
        """The template fields ``n_probe`` and ``outputs`` of the comment that says what was read."""
        return {"n_probe": str(len(self.images)), "outputs": self.described()}


def probe_outputs(data, load_model: Callable) -> Probe:
    """The model's outputs on the first two validation images (training images where val is empty)."""
    import numpy as np
    import torch

    from edgeslim.components.common.model_outputs import forward_tensors, output_names

    images = data.x_val[:2] if len(data.x_val) else data.x_train[:2]
    model = load_model().eval()
    outs = forward_tensors(model, torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
    return Probe(images, model, outs, output_names(len(outs)), [list(o.shape) for o in outs])
