"""edgeslim: registered PyTorch model in, gated int8 edge model out.

The stages are plain functions in :mod:`edgeslim.components`; Kubeflow
components wrap them in :mod:`edgeslim.components.kfp.ops`.
"""

from edgeslim.components.common.version import __version__  # noqa: F401
