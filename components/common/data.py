"""Dataset splits and the checks every provider's output goes through."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from edgeslim.components.common.errors import ConfigError, DataError

SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def check_labels(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if len(x) != len(y):
        raise DataError(f"data {where}: {len(x)} inputs but {len(y)} labels; they must pair up")


@dataclasses.dataclass
class Splits:
    """Train/validation/test arrays. Calibration only ever draws from train."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        for k in ("x_train", "x_val", "x_test"):
            arr = getattr(self, k)
            if arr.dtype != np.float32:
                setattr(self, k, arr.astype(np.float32))
        for split in ("train", "val", "test"):
            check_labels(getattr(self, f"x_{split}"), getattr(self, f"y_{split}"), split)
            if len(getattr(self, f"x_{split}")) == 0:
                raise DataError(f"data {self.source}: the {split} split is empty; it needs samples")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def calibration(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` samples from the train split (all of it when ``n`` is larger)."""
        n = min(n, len(self.x_train))
        idx = np.random.default_rng(seed).choice(len(self.x_train), size=n, replace=False)
        return self.x_train[np.sort(idx)]

    def digest(self) -> str:
        h = hashlib.sha256()
        for k in SPLIT_KEYS:
            a = getattr(self, k)
            h.update(k.encode())
            if a.dtype != object:
                h.update(np.ascontiguousarray(a).tobytes())
            else:
                for item in a:
                    h.update(np.ascontiguousarray(item).tobytes())
        return h.hexdigest()


# Providers that ship with edgeslim, found by name even where no entry points are installed
# (a source tree); a provider of the `edgeslim.datasets` entry-point group with the same name wins.
BUILTIN_PROVIDERS = {
    "sklearn-digits": "edgeslim.plugins.datasets:SklearnDigits",
    "npz": "edgeslim.plugins.datasets:NpzArrays",
    "digits-detect": "edgeslim.plugins.datasets:digits_detect",
}


def provider_class(name: str):
    """The data provider registered under ``name``: the ``edgeslim.datasets`` entry points, then the built-ins."""
    import importlib
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group="edgeslim.datasets")}
    if name in found:
        return found[name].load()
    if name in BUILTIN_PROVIDERS:
        module, _, attr = BUILTIN_PROVIDERS[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    known = sorted(set(found) | set(BUILTIN_PROVIDERS))
    raise ConfigError(f"data.provider: unknown provider {name!r}; known: {', '.join(known)}")


def load_data(provider: str, args: dict | None = None) -> Splits:
    """Build the provider with ``args`` and load its splits."""
    cls = provider_class(provider)
    try:
        inst = cls(**(args or {}))
    except TypeError as exc:
        raise ConfigError(f"data.args: {exc}; check the provider's arguments") from None
    return inst.load()


def describe_data(provider: str, args: dict | None = None) -> dict:
    """What the provider says of its data (for lineage), or its name and arguments."""
    inst = provider_class(provider)(**(args or {}))
    return inst.describe() if hasattr(inst, "describe") else {"provider": provider, **(args or {})}
