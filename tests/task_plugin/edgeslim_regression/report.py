"""The regressor's part of the report: the mean absolute error per label value, fp32 and int8 (measured
by :func:`figures`, drawn by :func:`charts`), and the rows of the figures its gate checks."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeslim.components.common.charts import FP32, INT8, Chart, bar_panels
from edgeslim.components.common.output_error import output_error

from edgeslim_regression.evaluate import predictions


def figures(candidate_onnx, *, parent_onnx, data, student_onnx=None) -> dict[str, Any]:
    y = np.asarray(data.y_test, np.float64)
    by_value = {}
    for who, path in (("fp32", parent_onnx), ("int8", candidate_onnx)):
        err = np.abs(predictions(path, data.x_test) - y)
        by_value[who] = {str(int(v)): round(float(err[y == v].mean()), 5) for v in np.unique(y)}
    return {"output_error": output_error(candidate_onnx, parent_onnx=parent_onnx, data=data,
                                         student_onnx=student_onnx),
            "mae_by_value": by_value}


def rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    s, c = rep["source"].get("regression") or {}, rep["candidate"].get("regression") or {}
    if not s or not c:
        return []
    return [("mean absolute error", f"{s['mae']:.4f}", f"{c['mae']:.4f}", f"{c['mae'] - s['mae']:+.4f}"),
            ("output SQNR (dB)", "", f"{rep['candidate']['fidelity']['sqnr_db']:.2f}", "")]


def charts(rep: dict[str, Any]) -> list[Chart]:
    fig = (rep.get("figures") or {}).get("mae_by_value")
    title = "Mean absolute error per label value, fp32 and int8"
    if not fig:
        return [Chart("regression-mae", title, None, "MAE per label value: not measured.")]
    rows_ = [{"value": v, "fp32": fig["fp32"][v], "int8": fig["int8"].get(v)} for v in fig["fp32"]]
    svg = bar_panels(title, rows_, "value", [("fp32 MAE", "fp32", FP32, None), ("int8 MAE", "int8", INT8, None)])
    return [Chart("regression-mae", title, svg, f"{len(rows_)} label value(s) of the test split.")]
