"""The classifier's part of the report: the output error against its fp32 model, and the rows of the
fidelity figures its gate checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeslim.components.common.output_error import output_error
from edgeslim.components.common.tasks import fused_kernel_row


def figures(candidate_onnx: str | Path, *, parent_onnx: str | Path, data,
            student_onnx: str | Path | None = None) -> dict[str, Any]:
    return {"output_error": output_error(candidate_onnx, parent_onnx=parent_onnx, data=data,
                                         student_onnx=student_onnx)}


def rows(rep: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    c = rep["candidate"]
    rows = [("top-1 agreement", "", f"{c['fidelity']['top1_agreement']:.4f}", ""),
            ("output SQNR (dB)", "", f"{c['fidelity']['sqnr_db']:.2f}", "")]
    return rows + fused_kernel_row(c, "top-1", rep.get("test_samples"))
