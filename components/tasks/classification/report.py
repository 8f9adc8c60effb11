"""The classifier's part of the report: the output error against its fp32 model, and the rows of the
fidelity figures its gate checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeslim.components.common.output_error import output_error


def figures(candidate_onnx: str | Path, *, parent_onnx: str | Path, data,
            student_onnx: str | Path | None = None) -> dict[str, Any]:
    return {"output_error": output_error(candidate_onnx, parent_onnx=parent_onnx, data=data,
                                         student_onnx=student_onnx)}


def rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    c = rep["candidate"]
    rows = [("top-1 agreement", "", f"{c['fidelity']['top1_agreement']:.4f}", ""),
            ("output SQNR (dB)", "", f"{c['fidelity']['sqnr_db']:.2f}", "")]
    if c.get("cpu_int8_kernel_metric") is not None:
        rows.append(("top-1, ORT fused int8 CPU kernels (%)", "", f"{c['cpu_int8_kernel_metric']:.2f}", "not gated"))
    return rows
