"""Distillation trains on the GPU when torch sees one (a GPU node of the cluster).

Skipped, with the reason, where torch sees no CUDA device.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device visible to torch on this machine")]


def test_distillation_runs_on_the_gpu_and_returns_a_cpu_model(digits, tiny_teacher, monkeypatch):
    from edgeslim.components.common.stage_configs import LogitDistillConfig
    from edgeslim.components.transform.distill import distill

    monkeypatch.delenv("EDGESLIM_DEVICE", raising=False)
    seen: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: seen.append(args[0].device.type) if args and isinstance(args[0], torch.Tensor) else None)
    try:
        res = distill(tiny_teacher, LogitDistillConfig(student="width", width=0.5, epochs=2), data=digits,
                      teacher=tiny_teacher)
    finally:
        handle.remove()
    assert "cuda" in seen
    assert next(res.model.parameters()).device.type == "cpu"
    assert res.metrics["student_top1_val"] > 50.0  # learned on the GPU: well above chance (10%)
