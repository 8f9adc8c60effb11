"""edgeslim's version, for every layer (registered models, reports and the flavor record it)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("edgeslim")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
