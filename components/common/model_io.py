"""Saving and loading torch modules whole, so they load back without their class's code path."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from edgeslim.components.common.errors import SourceError


def save_module(model, path: str | Path) -> Path:
    """Save a whole module (architecture and weights) with ``torch.save``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


def load_module(path: str | Path):
    """Load a module saved by :func:`save_module`.

    Raises:
        SourceError: the file is missing, corrupt, or not a ``torch.nn.Module``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"model file {path}: no such file")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, AttributeError,
            ModuleNotFoundError, ValueError) as exc:
        raise SourceError(
            f"model file {path} is corrupt or unreadable ({type(exc).__name__}: {str(exc)[:120]}); "
            "re-log the model with mlflow.pytorch.log_model(..., serialization_format='pickle')"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"model file {path} holds a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()
