"""Where training runs: a GPU when torch sees one, else the CPU; a bad request is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.transform.train import TrainConfig, fit, training_device


def test_the_cpu_is_chosen_where_torch_sees_no_gpu_and_the_model_stays_usable(monkeypatch):
    monkeypatch.delenv("EDGESLIM_DEVICE", raising=False)
    assert training_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("EDGESLIM_DEVICE", "cpu")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = fit(nn.Linear(4, 2), TrainConfig(epochs=30, lr=0.05, batch_size=8), x=x, y=y)
    assert next(model.parameters()).device.type == "cpu"
    assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.9


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: tests/gpu covers it")
@pytest.mark.parametrize("name, needle", [("cuda", "sees no CUDA device"), ("cuda:0", "sees no CUDA device"),
                                          ("tpu-please", "is not a torch device")])
def test_a_device_that_cannot_train_is_one_line_naming_it(monkeypatch, name, needle):
    monkeypatch.setenv("EDGESLIM_DEVICE", name)
    with pytest.raises(ConfigError) as err:
        training_device()
    assert needle in str(err.value) and "EDGESLIM_DEVICE" in str(err.value) and "\n" not in str(err.value)
