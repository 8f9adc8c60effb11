"""Bias correction of a Q/DQ ONNX: each quantized layer's own mean output shift, removed from its bias.

Rounding a layer's weights to int8 (and its input to the input's int8 grid, clipping included) moves
that layer's output, per output channel, by an amount whose mean over the data is not zero: the
rounding errors of one channel's weights do not cancel against the input's mean. Through a network
those shifts add up, and a detector's box regression and scores feel them (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", 2019). The shift of a Conv's output
channel ``o`` over the calibration images is

    E[conv(dq(x), dq(W))[o]] - E[conv(x, W)[o]]
      = sum over (i, kh, kw) of dq(W)[o, i, kh, kw] * Mq[i, kh, kw] - W[o, i, kh, kw] * M[i, kh, kw]

where ``x`` is the layer's float input in the quantized model, ``M[i, kh, kw]`` the mean of ``x``'s
channel ``i`` under kernel tap ``(kh, kw)`` over every output position (padding counted as zeros) and
``Mq`` the same of ``dq(x)``. One pass of the quantized model over the calibration images gives every
layer's ``M`` and ``Mq`` at once (accumulated batch by batch; no activation is kept), and each bias
then loses its layer's shift. Conv (2-D, grouped and depthwise included) and Gemm are corrected; a
layer whose bias is not a float initializer of its own, or that is not quantized at all, is left as
it is. Nothing is assumed about the model but its ops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

INT8 = (-128, 127)


def _init_arrays(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _dequantized(name: str, producer: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The float value of constant ``name``: an initializer, or DequantizeLinear of one (per-tensor or
    per-channel on its ``axis``)."""
    if name in arrays:
        return arrays[name].astype(np.float32)
    node = producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in arrays:
        return None
    q, scale = arrays[node.input[0]].astype(np.float32), arrays[node.input[1]].astype(np.float32)
    zp = arrays[node.input[2]].astype(np.float32) if len(node.input) > 2 and node.input[2] in arrays else 0.0
    if np.ndim(scale) == 1 and scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = np.reshape(zp, shape) if np.ndim(zp) else zp
    return (q - zp) * scale


def _input_quantizer(name: str, producer: dict[str, Any], arrays: dict[str, np.ndarray]):
    """``(float tensor, scale, zero point)`` when ``name`` is DequantizeLinear(QuantizeLinear(float
    tensor)) with per-tensor constants; ``(name, None, None)`` when the input is not quantized."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return name, None, None
    q = producer.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or dq.input[1] not in arrays:
        return None
    scale = arrays[dq.input[1]]
    zp = arrays[dq.input[2]] if len(dq.input) > 2 and dq.input[2] in arrays else np.zeros((), np.int8)
    if scale.size != 1:
        return None
    return q.input[0], float(scale), float(zp)


def _fake_quant(x: np.ndarray, scale: float | None, zp: float | None) -> np.ndarray:
    if scale is None:
        return x
    return (np.clip(np.rint(x / scale) + zp, *INT8) - zp) * scale  # rint: half to even, as QuantizeLinear


class _Layer:
    """One correctable layer: its float input, that input's quantizer, its weights before and after
    rounding, and the running sums of its input's tap means."""

    def __init__(self, node, x: str, scale, zp, w: np.ndarray, wq: np.ndarray, bias: str):
        self.node, self.x, self.scale, self.zp, self.w, self.wq, self.bias = node, x, scale, zp, w, wq, bias
        self.sum = self.sum_q = None
        self.count = 0
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv":
            k = w.shape[2:]
            self.strides = list(attrs["strides"].ints) if "strides" in attrs else [1, 1]
            self.dil = list(attrs["dilations"].ints) if "dilations" in attrs else [1, 1]
            self.pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
            self.group = attrs["group"].i if "group" in attrs else 1
            self.k = k
        else:
            self.trans_b = attrs["transB"].i if "transB" in attrs else 0
            self.trans_a = attrs["transA"].i if "transA" in attrs else 0

    def add(self, x: np.ndarray) -> None:
        xq = _fake_quant(x, self.scale, self.zp)
        s, sq, n = (self._taps(x), self._taps(xq), self._positions(x)) if self.node.op_type == "Conv" else (
            self._rows(x), self._rows(xq), (x.shape[1] if self.trans_a else x.shape[0]))
        self.sum = s if self.sum is None else self.sum + s
        self.sum_q = sq if self.sum_q is None else self.sum_q + sq
        self.count += n

    def _rows(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64).sum(axis=1 if self.trans_a else 0)

    def _out_size(self, x: np.ndarray) -> tuple[int, int]:
        (h, w), (sh, sw), (dh, dw), (kh, kw) = x.shape[2:], self.strides, self.dil, self.k
        p = self.pads
        return (h + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1, (w + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1

    def _positions(self, x: np.ndarray) -> int:
        ho, wo = self._out_size(x)
        return x.shape[0] * ho * wo

    def _taps(self, x: np.ndarray) -> np.ndarray:
        """Per input channel and kernel tap, the sum of ``x`` (zero-padded) over every image and output
        position: (C, kh, kw). Rows and columns separate, so each tap costs a slice and a sum."""
        ho, wo = self._out_size(x)
        (sh, sw), (dh, dw), (kh, kw), p = self.strides, self.dil, self.k, self.pads
        xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
        out = np.empty((x.shape[1], kh, kw))
        for i in range(kh):
            rows = xp[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, :].sum(axis=(0, 2))  # (C, Wpad)
            for j in range(kw):
                out[:, i, j] = rows[:, j * dw: j * dw + (wo - 1) * sw + 1: sw].sum(axis=1)
        return out

    def shift(self) -> np.ndarray:
        """The layer's mean output shift per output channel."""
        m, mq = self.sum / self.count, self.sum_q / self.count
        if self.node.op_type == "Conv":
            cout, cg = self.w.shape[0], self.w.shape[1]
            g = np.arange(cout) // (cout // self.group)  # each output channel's group
            m_o = m.reshape(self.group, cg, *m.shape[1:])[g]  # (Cout, Cg, kh, kw): the inputs it reads
            mq_o = mq.reshape(self.group, cg, *mq.shape[1:])[g]
            return (self.wq * mq_o).sum(axis=(1, 2, 3)) - (self.w * m_o).sum(axis=(1, 2, 3))
        w, wq = (self.w.T, self.wq.T) if self.trans_b else (self.w, self.wq)  # (K, N)
        return mq @ wq - m @ w


def correctable_layers(qdq_model, fp32_model) -> list[_Layer]:
    """The Conv (4-D weights) and Gemm nodes of ``qdq_model`` whose weights or input are quantized and
    whose bias is a float initializer used by that node alone; their fp32 weights come from the node of
    the same name in ``fp32_model`` (the graph ``qdq_model`` was quantized from)."""
    g = qdq_model.graph
    arrays, producer = _init_arrays(g), {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    fp32_arrays = _init_arrays(fp32_model.graph)
    fp32_weight = {n.name: n.input[1] for n in fp32_model.graph.node
                   if n.name and n.op_type in ("Conv", "Gemm") and len(n.input) > 1}
    out = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in arrays:
            continue
        if uses.get(n.input[2], 0) != 1 or arrays[n.input[2]].dtype != np.float32 or n.name not in fp32_weight:
            continue
        w = fp32_arrays.get(fp32_weight[n.name])
        wq = _dequantized(n.input[1], producer, arrays)
        quantizer = _input_quantizer(n.input[0], producer, arrays)
        if w is None or wq is None or quantizer is None or w.shape != wq.shape:
            continue
        if (n.op_type == "Conv" and w.ndim != 4) or (n.op_type == "Gemm" and w.ndim != 2):
            continue
        x, scale, zp = quantizer
        if scale is None and np.array_equal(w, wq):
            continue  # float layer: nothing to correct
        out.append(_Layer(n, x, scale, zp, w.astype(np.float64), wq.astype(np.float64), n.input[2]))
    return out


def correct_bias(qdq_path: str | Path, fp32_model, x, rows: np.ndarray, input_name: str, *,
                 memory: int = 1 << 30, max_batch: int = 64) -> dict[str, Any]:
    """Remove each correctable layer's mean output shift (module docstring) from its bias, in place.

    Args:
        qdq_path: the Q/DQ ONNX to correct (rewritten).
        fp32_model: the ModelProto it was quantized from (node names shared): the float weights.
        x, rows: the images (``x[rows]``, fed to input ``input_name``) the shifts are measured on, read in
            batches of at most ``max_batch`` whose probed layer inputs hold at most ``memory`` bytes.

    Returns:
        ``{"layers": how many biases changed, "max_shift": the largest |shift| removed, "mean_abs_shift"}``.
    """
    import onnx
    from onnx import numpy_helper

    from edgeslim.components.common.onnx_runtime import session_with_outputs

    model = onnx.load(str(qdq_path))
    layers = correctable_layers(model, fp32_model)
    if not layers or not len(rows):
        return {"layers": 0, "max_shift": 0.0, "mean_abs_shift": 0.0}
    names = list(dict.fromkeys(lay.x for lay in layers))
    with session_with_outputs(onnx.load(str(qdq_path)), names) as sess:
        out_names = [o.name for o in sess.get_outputs()]
        pick = {n: out_names.index(n) for n in names}

        def run(batch: np.ndarray) -> int:
            outs = sess.run(None, {input_name: batch})
            for lay in layers:
                lay.add(outs[pick[lay.x]])
            return sum(outs[i].nbytes for i in set(pick.values()))

        per_image = run(np.ascontiguousarray(x[rows[:1]]))
        size = int(min(max_batch, max(1, memory // max(per_image, 1))))
        for i in range(1, len(rows), size):
            run(np.ascontiguousarray(x[rows[i:i + size]]))
    inits = {i.name: i for i in model.graph.initializer}
    shifts = []
    for lay in layers:
        s = lay.shift()
        b = numpy_helper.to_array(inits[lay.bias]).astype(np.float64)
        inits[lay.bias].CopyFrom(numpy_helper.from_array((b - s).astype(np.float32), lay.bias))
        shifts.append(np.abs(s))
    onnx.save(model, str(qdq_path))
    allabs = np.concatenate(shifts)
    return {"layers": len(layers), "max_shift": round(float(allabs.max()), 6),
            "mean_abs_shift": round(float(allabs.mean()), 6)}
