"""edgeslim: registered PyTorch model in, gated int8 edge model out.

The stages are plain functions in :mod:`edgeslim.components`; Kubeflow
components wrap them in :mod:`edgeslim.components.kfp.ops`.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("edgeslim")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
