"""The errors edgeslim raises on purpose.

The CLI turns every ``EdgeslimError`` into one line on stderr and a non-zero
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeslimError(Exception):
    """Base of every error that edgeslim reports to a user as one line."""

    exit_code = 2


class ConfigError(EdgeslimError, ValueError):
    """A recipe or config value is wrong; the message names the key and the fix."""


class SourceError(EdgeslimError):
    """The source model cannot be found, loaded or used."""


class DataError(EdgeslimError):
    """Data cannot be loaded, or does not fit the model."""


class TrackingUnavailable(EdgeslimError):
    """The MLflow tracking server cannot be reached."""


class GateRejected(EdgeslimError):
    """The candidate failed its accuracy gate. Not a crash: exit code 3."""

    exit_code = 3


class MissingDependencyError(EdgeslimError, ImportError):
    """An optional dependency is missing; the message carries the install hint."""

    def __init__(self, package: str, extra: str | None = None, why: str = "") -> None:
        hint = f"pip install 'edgeslim[{extra}]'" if extra else f"pip install {package}"
        msg = f"{package} is not installed{': ' + why if why else ''}; install it with: {hint}"
        super().__init__(msg)
        self.package = package


class DeviceError(EdgeslimError):
    """A device class, engine or build node does not match what was asked for."""


class FleetError(EdgeslimError):
    """A rollout cannot proceed (lock held, bad manifest, unreachable store)."""
