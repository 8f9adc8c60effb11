"""The fallback ranking of the accuracy-aware search for models judged by their outputs (detectors,
segmenters): which groups of nodes to keep in float, the most damaging first.

Each *output tail* (:func:`~edgeslim.components.quantize.sensitivity.output_tails`: a graph output with the
nodes that produce it, back to and including its last weighted layers) is measured alone in int8, everything
else float, and ranked by the strategy's damage (ties: the lower output SQNR); a single tail ranks first
unmeasured. When there are fewer tails than ``max_float_layers``, the other conv/linear layers follow, ranked
by a one-pass proxy (:func:`~edgeslim.components.quantize.sensitivity.layer_noise_proxy`: the SQNR of each
layer's own int8 rounding, every layer's input captured in one ONNX Runtime pass over a few val images), so
the search's cost does not grow with the number of layers."""

from __future__ import annotations

import dataclasses
from typing import Any

LAYER_SAMPLES = 8  # val images the single layers' one-pass proxy is measured on


def rank_output_tails(strategy, ranked: tuple[str, ...], fp32_onnx, config, *, calibrator: str, ranges, data,
                      out_dir, pinned, skip_pinned_tails: bool) -> list[dict[str, Any]]:
    """The fallback's groups ``[{"label", "nodes"}]``, most damaging first, for ``strategy`` (its ``judge`` and
    ``damage`` score a tail's trial; the figures ``ranked`` of each judged row go into its table).

    ``pinned`` are the nodes every trial keeps in float; with ``skip_pinned_tails`` a tail wholly inside them
    is not ranked. Sets ``strategy.table`` (tails, then single layers, with their figures)."""
    import onnx

    from edgeslim.components.quantize.ptq import quantize
    from edgeslim.components.quantize.sensitivity import (layer_noise_proxy, output_tails, preprocessed,
                                                          quantizable_layers)

    pre = preprocessed(fp32_onnx, out_dir / "pre.onnx")
    all_nodes = [n.name for n in onnx.load(str(pre)).graph.node if n.name]
    tails = output_tails(pre)
    if skip_pinned_tails:
        tails = [t for t in tails if not set(t["nodes"]) <= set(pinned)]
    heads: list[dict[str, Any]] = []
    for i, grp in enumerate(tails if len(tails) > 1 else []):  # one tail ranks first unmeasured
        others = [n for n in all_nodes if n not in grp["nodes"]]
        # The fp32 graph (not ``pre``): the graph ``ranges`` were calibrated on; node names are the same.
        res = quantize(fp32_onnx, dataclasses.replace(config.ptq(calibrator), float_layers=others), data=data,
                       out_dir=out_dir / "heads" / f"group{i}", ranges=ranges)
        r = strategy.judge(res.model, data)
        heads.append({**grp, **{k: r[k] for k in ranked}, "damage": round(strategy.damage(r), 4)})
    heads = sorted(heads, key=lambda r: (-r["damage"], r["sqnr_db"])) or [
        {**t, **dict.fromkeys(ranked), "damage": None} for t in tails]
    ranked_heads = [r for r in heads if (r["damage"] or 0.0) > 0.0] or heads
    layers: list[dict[str, Any]] = []
    if config.max_float_layers > len(tails):  # too few tails to fill the fallback: single layers too
        in_tails = {n for g in tails for n in g["nodes"]} | set(pinned)
        singles = [lay for lay in quantizable_layers(pre) if lay["node"] not in in_tails]
        proxy = layer_noise_proxy(pre, ranges, data.x_val[:LAYER_SAMPLES], [lay["node"] for lay in singles])
        layers = sorted(({"output": lay["layer"], "nodes": [lay["node"]], "layers": [lay["node"]],
                          "sqnr_db": proxy[lay["node"]], "proxy": "own int8 rounding, one pass",
                          "damage": None} for lay in singles), key=lambda r: r["sqnr_db"])
    strategy.table = heads + layers
    return [{"label": r["output"], "nodes": r["nodes"]} for r in ranked_heads + layers]
