"""Per-layer quantization sensitivity: what each layer costs when it alone is int8.

For every conv/linear node of the fp32 ONNX, the PTQ quantizer runs with every
*other* node in ``float_layers``; the metric drop and the output SQNR of that
one-layer-int8 model against the fp32 model rank the layers. The ranking feeds
the accuracy-aware fallback (:mod:`edgeslim.components.quantize.search`), which keeps
the top layers in float. That costs a quantized model and an inference per layer (the split is read
once per :data:`MODELS_PER_PASS` of them, and only per-batch figures are summed);
:func:`layer_noise_proxy` ranks every layer from one pass instead (the detector search's
single layers).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.components.common.charts import BAR, FAIL, bar_panels, write_svg
from edgeslim.components.common.data import Splits
from edgeslim.components.common.stage_configs import PTQQuantizeConfig

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def preprocessed(fp32_onnx: str | Path, out_path: str | Path) -> Path:
    """The graph the quantizer sees (ORT's pre-processing: BatchNorm folded), whose node
    names ``float_layers`` refer to."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_onnx), str(out_path), skip_symbolic_shape=True)
    return Path(out_path)


def _weighted(node, inits: set[str]) -> bool:
    return node.op_type in QUANTIZABLE_OPS and len(node.input) > 1 and node.input[1] in inits


def quantizable_layers(pre_onnx: str | Path) -> list[dict[str, str]]:
    """Conv/linear nodes with weights: ``{node, layer, op}``; ``layer`` is the torch
    module name read from the weight initializer (``features.3.weight`` -> ``features.3``)."""
    import onnx

    g = onnx.load(str(pre_onnx)).graph
    inits = {i.name for i in g.initializer}
    out = []
    for n in g.node:
        if n.name and _weighted(n, inits):
            w = n.input[1]
            layer = w[: -len(".weight")] if w.endswith(".weight") else w
            out.append({"node": n.name, "layer": layer, "op": n.op_type})
    return out


# Nodes that only compute shapes and constants (never quantized): a tail does not walk into them.
_SHAPE_OPS = ("Shape", "Size", "Constant", "ConstantOfShape")
_DECODE_DEPTH = 2  # weighted decode nodes (a DFL's fixed conv) a tail may pass, one after another


def output_tails(pre_onnx: str | Path) -> list[dict[str, Any]]:
    """Per graph output, its *tail*: the nodes between the output and the last weighted
    (Conv/Gemm/MatMul) layers on each path to it -- box decode, concat, sigmoid, softmax --
    together with those layers, found from the graph alone.

    A weighted node that reads a Concat merging two or more weighted layers is taken as
    part of the decode (a DFL's fixed 1x1 conv over a softmax of all levels), so the tail
    goes on through it to the layers it merges (the per-level output convs).

    Returns:
        ``[{"output", "nodes", "layers"}]`` in output order: ``nodes`` from the output back
        (the layers last), ``layers`` the last weighted layers; outputs that no weighted
        layer feeds have no tail.
    """
    import onnx

    g = onnx.load(str(pre_onnx)).graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    static: set[str] = set(inits)  # tensors that hold shapes or constants only
    for n in g.node:
        if n.op_type in _SHAPE_OPS or all(i in static for i in n.input if i):
            static.update(n.output)

    def region(tensors: list[str]) -> tuple[list[Any], list[Any]]:
        """Non-weighted nodes reached backwards from ``tensors`` and the weighted nodes that end each path."""
        seen, nodes, last, queue = set(), [], [], [t for t in tensors if t not in static]
        while queue:
            n = producer.get(queue.pop(0))
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if _weighted(n, inits):
                last.append(n)
                continue
            nodes.append(n)
            queue.extend(i for i in n.input if i and i not in static)
        return nodes, last

    tails = []
    for out in g.output:
        order: list[str] = []
        layers: list[str] = []
        frontier = [out.name]
        for depth in range(_DECODE_DEPTH + 1):
            nodes, last = region(frontier)
            order += [n.name for n in nodes if n.name and n.name not in order]
            frontier = []
            for w in last:
                behind, feeding = region(list(w.input[:1]))
                decode = len({f.name for f in feeding}) > 1 and any(b.op_type == "Concat" for b in behind)
                if decode and depth < _DECODE_DEPTH:
                    order += [w.name] if w.name not in order else []
                    frontier.append(w.input[0])
                elif w.name and w.name not in layers:
                    layers.append(w.name)
            if not frontier:
                break
        if layers:
            tails.append({"output": out.name, "nodes": order + [n for n in layers if n not in order],
                          "layers": layers})
    return tails


def input_layers(pre_onnx: str | Path) -> list[dict[str, Any]]:
    """Per graph input, its *head*: the first weighted (Conv/Gemm/MatMul) layers on each path from
    the input, with the nodes between (a normalization's Sub/Div, a Pad), found from the graph alone.

    Their input is the data as it comes in: an image's 256 levels on 0..1, which a symmetric int8 scale
    (zero point 0, as TensorRT wants) spreads over -1..1, keeping 128 of them. Their weights are a
    few hundred parameters (3 input channels).

    Returns:
        ``[{"input", "nodes", "layers"}]`` in input order: ``nodes`` the ones between and the layers,
        ``layers`` the first weighted layers; an input that reaches no weighted layer has no head.
    """
    import onnx

    g = onnx.load(str(pre_onnx)).graph
    inits = {i.name for i in g.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    heads = []
    for inp in g.input:
        if inp.name in inits:
            continue
        seen, nodes, layers, queue = set(), [], [], [inp.name]
        while queue:
            for n in consumers.get(queue.pop(0), []):
                if id(n) in seen or n.op_type in _SHAPE_OPS:
                    continue
                seen.add(id(n))
                if _weighted(n, inits):
                    layers.append(n.name)
                    continue
                nodes.append(n.name)
                queue.extend(n.output)
        if layers:
            heads.append({"input": inp.name, "nodes": [n for n in nodes if n] + layers, "layers": layers})
    return heads


def _weight_axis(node) -> int:
    """The output-channel axis of a weighted node's weight (per-channel quantization's axis)."""
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not any(
            a.name == "transB" and a.i for a in node.attribute)):
        return -1  # (in, out)
    return 1 if node.op_type == "ConvTranspose" else 0


def _fake_quant(x: np.ndarray, amax: np.ndarray | float) -> np.ndarray:
    """Symmetric int8 round trip with ``amax`` (a scalar, or per element along a broadcast axis)."""
    scale = np.where(np.asarray(amax) > 0, np.asarray(amax, np.float64) / 127.0, 1.0)
    return np.clip(np.round(x / scale), -128, 127) * scale


def layer_noise_proxy(pre_onnx: str | Path, ranges: dict[str, float], x, nodes: list[str] | None = None,
                      batch: int = 2) -> dict[str, float]:
    """A one-pass sensitivity proxy: per conv/linear node, the SQNR (dB) of its own int8 rounding --
    its input activation with its calibrated range (``ranges``, symmetric) and its weight per output
    channel (symmetric max-abs) -- with both noises' powers summed relative to their signals.

    One ONNX Runtime pass over ``x`` (a few images, ``batch`` at a time) captures every node's input
    at once, instead of a quantized model and an inference per layer, so the cost does not grow with
    the number of layers beyond that pass. It is local (noise that later layers amplify or damp is not
    seen), so it ranks candidates; the fallback's trials judge them.

    Args:
        pre_onnx: the pre-processed graph (:func:`preprocessed`) ``ranges`` were calibrated on.
        ranges: per-tensor amax (:func:`~edgeslim.components.quantize.ptq.calibrate_onnx`); an input
            without a range counts as unquantized.
        x: the images (a validation subsample).
        nodes: the nodes to measure (default: every :func:`quantizable_layers` node).

    Returns:
        ``{node: sqnr_db}`` (the lower, the more damage the node's own int8 does).
    """
    import onnx
    from onnx import numpy_helper

    from edgeslim.components.common.onnx_runtime import session_with_outputs

    model = onnx.load(str(pre_onnx))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    wanted = set(nodes) if nodes is not None else {lay["node"] for lay in quantizable_layers(pre_onnx)}
    layers = [n for n in g.node if n.name in wanted and _weighted(n, set(inits))]
    weight_nsr = {}
    for n in layers:  # per-channel symmetric rounding of the weight (what PTQ does to it)
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        axis = _weight_axis(n) % w.ndim
        amax = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != axis), keepdims=True)
        weight_nsr[n.name] = float(np.sum((w - _fake_quant(w, amax)) ** 2) / max(np.sum(w * w), 1e-30))
    inputs = sorted({n.input[0] for n in layers if n.input[0] not in inits})
    signal, noise = dict.fromkeys(inputs, 0.0), dict.fromkeys(inputs, 0.0)
    graph_inputs = {i.name for i in g.input}
    with session_with_outputs(model, [t for t in inputs if t not in graph_inputs]) as sess:
        names = [o.name for o in sess.get_outputs()]
        feed = sess.get_inputs()[0].name
        for i in range(0, len(x), batch):
            xb = np.ascontiguousarray(x[i:i + batch])
            got = dict(zip(names, sess.run(None, {feed: xb})))
            got.update({t: xb for t in graph_inputs})
            for t in inputs:
                if t in ranges:
                    v = got[t].astype(np.float64)
                    signal[t] += float(np.sum(v * v))
                    noise[t] += float(np.sum((v - _fake_quant(v, ranges[t])) ** 2))
    out = {}
    for n in layers:
        t = n.input[0]
        nsr = weight_nsr[n.name] + (noise[t] / signal[t] if signal[t] > 0 else 0.0)
        out[n.name] = round(float(10.0 * np.log10(1.0 / nsr)) if nsr > 0 else float("inf"), 3)
    return out


# One-layer-int8 models run side by side with the fp32 model per pass over the split: each pass reads
# (decodes) the split once for all of them, and this many sessions are held at once.
MODELS_PER_PASS = 4


def _flat(outputs: list[np.ndarray]) -> np.ndarray:
    """A model's outputs on a batch as ``(n, k)``, several flattened and joined (as ``run_batched`` joins them)."""
    return outputs[0] if len(outputs) == 1 else np.concatenate([o.reshape(len(o), -1) for o in outputs], 1)


def _scores(fp32: str | Path, models: list[Path], x, y) -> tuple[float, list[tuple[float, float]]]:
    """The fp32 model's top-1 (%) on ``x`` and, per model of ``models``, its top-1 and the SQNR (dB) of
    its outputs against the fp32 model's: one pass over ``x`` with every model on each batch, correct
    counts and signal and noise powers summed per batch (no model's outputs over the split are held)."""
    from edgeslim.components.common.onnx_runtime import SqnrAccumulator, make_session, run_side_by_side

    y = np.asarray(y)
    right = np.zeros(len(models) + 1, np.int64)
    sqnr = [SqnrAccumulator() for _ in models]
    sessions = [make_session(p, basic=None, side_by_side=True) for p in (fp32, *models)]
    for start, rows, outs in run_side_by_side(sessions, x):
        ref = _flat(outs[0])
        labels = y[start:start + len(rows)]
        right[0] += int((ref.argmax(1) == labels).sum())
        for k, (out, acc) in enumerate(zip(outs[1:], sqnr), 1):
            out = _flat(out)
            right[k] += int((out.argmax(1) == labels).sum())
            acc.add(ref, out)
    top1 = right * 100.0 / max(len(y), 1)
    return float(top1[0]), [(float(t), acc.db()) for t, acc in zip(top1[1:], sqnr)]


@dataclasses.dataclass
class LayerSensitivity:
    node: str
    layer: str
    op: str
    metric: float
    metric_drop: float
    sqnr_db: float
    rank: int = 0
    nodes: list[str] = dataclasses.field(default_factory=list)


def layer_sensitivity(fp32_onnx: str | Path, config: PTQQuantizeConfig, *, data: Splits,
                      work_dir: str | Path | None = None, split: str = "val", tails: bool = False) -> dict[str, Any]:
    """Quantize one layer at a time and rank the layers by what it costs.

    Args:
        fp32_onnx: the fp32 model.
        config: PTQ settings (calibrator, samples); its ``float_layers`` are ignored.
        data: calibration from the train split; scores on ``split``.
        work_dir: where the one-layer models go (a temporary folder when None).
        split: ``val`` (default: ranking is a choice, so keep the test split out of it) or ``test``.
        tails: measure each output's tail (:func:`output_tails`) too, as one row (op ``tail``),
            where it is more than its one layer (a softmax or decode after the last linear layer).

    Returns:
        ``{"split", "fp32_metric", "calibrator", "layers": [rows, most sensitive first]}``;
        a row has node, layer, op, metric, metric_drop (points), sqnr_db and nodes (what was int8).
    """
    from edgeslim.components.quantize.ptq import calibrate_onnx, quantize

    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    with tempfile.TemporaryDirectory(prefix="edgeslim-sens-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        pre = preprocessed(fp32_onnx, root / "pre.onnx")
        import onnx

        all_nodes = [n.name for n in onnx.load(str(pre)).graph.node if n.name]
        rows = []
        ranges = calibrate_onnx(pre, config, data)  # once: float_layers never changes a range
        groups = [{**lay, "nodes": [lay["node"]]} for lay in quantizable_layers(pre)]
        if tails:
            groups += [{"node": f"tail:{t['output']}", "layer": f"tail of {t['output']}", "op": "tail", "nodes": t["nodes"]}
                       for t in output_tails(pre) if len(t["nodes"]) > 1]
        base = None
        for first in range(0, max(len(groups), 1), MODELS_PER_PASS):
            chunk = groups[first:first + MODELS_PER_PASS]
            models = []
            for i, layer in enumerate(chunk, first):
                others = [n for n in all_nodes if n not in layer["nodes"]]
                cfg = dataclasses.replace(config, float_layers=others)
                models.append(quantize(pre, cfg, data=data, out_dir=root / f"layer{i:03d}", ranges=ranges).model)
            base, scores = _scores(pre, models, x, y)
            for layer, (metric, db) in zip(chunk, scores):
                rows.append(LayerSensitivity(layer["node"], layer["layer"], layer["op"], round(metric, 4),
                                             round(base - metric, 4), round(db, 3), nodes=layer["nodes"]))
    rows.sort(key=lambda r: (-r.metric_drop, r.sqnr_db))
    for i, r in enumerate(rows, 1):
        r.rank = i
    return {"split": split, "fp32_metric": round(base, 4), "calibrator": config.calibrator,
            "layers": [dataclasses.asdict(r) for r in rows]}


def rank(table: dict[str, Any], by: str = "drop") -> list[str]:
    """Node names, most sensitive first: by metric drop (ties: lower SQNR) or by SQNR alone."""
    rows = table["layers"]
    if by == "sqnr":
        rows = sorted(rows, key=lambda r: r["sqnr_db"])
    return [r["node"] for r in rows]


def format_table(table: dict[str, Any]) -> str:
    """The ranked table as text (for the CLI and the report)."""
    lines = [f"per-layer sensitivity ({table['calibrator']}, {table['split']} split, "
             f"fp32 top-1 {table['fp32_metric']:.2f}%): only the named layer int8",
             f"{'rank':>4}  {'layer':<28} {'op':<6} {'top-1 %':>8} {'drop pt':>8} {'SQNR dB':>8}"]
    for r in table["layers"]:
        lines.append(f"{r['rank']:>4}  {r['layer'][:28]:<28} {r['op']:<6} {r['metric']:>8.2f} "
                     f"{r['metric_drop']:>8.2f} {r['sqnr_db']:>8.2f}")
    return "\n".join(lines)


# The chart's panels (:func:`~edgeslim.components.common.charts.bar_panels`); the report draws the table
# with them too. An exact layer's SQNR is infinite: it is drawn at 80 dB.
CHART_SERIES = [("top-1 drop (pt) when only this layer is int8", "metric_drop", FAIL, None),
                ("output SQNR (dB)", "sqnr_db", BAR, 80.0)]


def bar_chart(table: dict[str, Any], path: str | Path) -> Path:
    """An SVG with the metric drop and the SQNR per layer, most sensitive on top."""
    title = f"Per-layer int8 sensitivity ({table['calibrator']} calibration)"
    return write_svg(bar_panels(title, table["layers"], "layer", CHART_SERIES), path)


def write(table: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``sensitivity.json``, ``sensitivity.txt`` and ``sensitivity.svg`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "sensitivity.json", "txt": out_dir / "sensitivity.txt",
             "svg": out_dir / "sensitivity.svg"}
    paths["json"].write_text(json.dumps(table, indent=1))
    paths["txt"].write_text(format_table(table) + "\n")
    bar_chart(table, paths["svg"])
    return paths


def log_to_mlflow(table: dict[str, Any], paths: dict[str, Path], client, run_id: str) -> None:
    """The table (as an MLflow table and JSON), the text and the chart, in run ``run_id``."""
    for p in paths.values():
        client.log_artifact(run_id, str(p), artifact_path="sensitivity")
    client.log_table(run_id, data={k: [r[k] for r in table["layers"]] for k in
                                   ("rank", "layer", "node", "op", "metric", "metric_drop", "sqnr_db")},
                     artifact_file="sensitivity/sensitivity_table.json")
