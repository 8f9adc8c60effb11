"""Tiny trained reference models shared by the compression-stage tests.

Trained once per test process (seeded, a few epochs): the two architectures
every compression stage is tested on.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import os
import tempfile
from pathlib import Path

import pytest
import torch

from edgeslim.components.reference import digits as reference

from edgeslim.components.reference import mobile as reference_mobile
from edgeslim.components.common.model_io import load_module, save_module
from edgeslim.components.reference.digits import DigitsCNN, train_classifier
from edgeslim.components.reference.mobile import DigitsMobileNet
from edgeslim.plugins.datasets import SklearnDigits
from tests.spread import SEED

WORKLOADS = ("cnn", "mobile")


@functools.lru_cache(maxsize=None)
def digits():
    return SklearnDigits().load()


def _cache_path(kind: str) -> Path:
    # Training is seeded, so a model trained by the same code and torch is the same model:
    # keep it between runs to spare the shared CPU (delete the folder to retrain).
    # torch's CPU kernels round differently, so they make another model too.
    h = hashlib.sha256((inspect.getsource(reference) + inspect.getsource(reference_mobile)
                        + torch.__version__ + torch.backends.cpu.get_cpu_capability()
                        + f"{kind}-seed{SEED}").encode()).hexdigest()[:12]
    root = Path(os.environ.get("EDGESLIM_TEST_CACHE", Path(tempfile.gettempdir()) / "edgeslim-test-models"))
    return root / f"{kind}-{h}.pt"


@functools.lru_cache(maxsize=None)
def trained(kind: str) -> torch.nn.Module:
    """A small trained model; tests must not change it (the stages copy their inputs)."""
    path = _cache_path(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Test processes running side by side (pytest -n) train it once: the first holds the lock, the
    # others wait for it and load what it saved.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return load_module(path)
        return _train_and_save(kind, path)


def _train_and_save(kind: str, path: Path) -> torch.nn.Module:
    d = digits()
    # One thread whoever asks first: the thread count changes float sums, so the trained model.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if kind == "cnn":
            torch.manual_seed(SEED)
            model = train_classifier(DigitsCNN(width=8), d.x_train, d.y_train, epochs=4, seed=SEED)
        else:
            torch.manual_seed(SEED)
            model = train_classifier(DigitsMobileNet(width=1.0), d.x_train, d.y_train, epochs=6, seed=SEED)
    finally:
        torch.set_num_threads(before)
    save_module(model, path)
    return model


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hard_to_quantize(kind: str) -> tuple[torch.nn.Module, str]:
    """A copy of ``trained(kind)`` with one layer whose weights int8 cannot hold well.

    In every output channel one weight is raised to 20x the channel's largest, so
    the per-channel scale leaves the other weights about 6 levels: that layer,
    quantized alone, costs far more output SQNR than any other.
    """
    import copy

    # A layer whose output no later layer quantizes: the CNN's last Linear (its output is the
    # graph's), the mobile net's last projection. Outlier weights inside the network also inflate
    # the activations that the next layer quantizes, and keeping the damaged layer in float cannot
    # repair that: with the CNN's features.7, the float fallback lost 1.3-1.4 dB of SQNR on three of
    # nine seed x kernel runs (bash tests/spread.sh) while gaining 2-5 dB on the others.
    layer = "classifier.4" if kind == "cnn" else "blocks.2.block.6"
    model = copy.deepcopy(trained(kind))
    with torch.no_grad():
        w = model.get_submodule(layer).weight
        flat = w.view(w.shape[0], -1)
        flat[:, 0] = 20.0 * flat.abs().amax(dim=1)
    return model, layer


@functools.lru_cache(maxsize=None)
def onnx_of(kind: str, damaged: bool = False) -> str:
    """The fp32 ONNX of ``trained(kind)`` (or of its hard-to-quantize copy), exported once."""
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    model = hard_to_quantize(kind)[0] if damaged else trained(kind)
    out = Path(tempfile.mkdtemp(prefix="edgeslim-test-onnx-")) / f"{kind}{'-damaged' if damaged else ''}.onnx"
    return str(export(model, OnnxExportConfig(check_samples=8), data=digits(), out_path=out).model)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train faster on one thread, and the shared machine's other jobs too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
