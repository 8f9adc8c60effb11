"""Why a manifest cannot be applied on this device.

The poll loop records an :class:`ApplyFailed` as the manifest's ``failed`` result and never
retries that sequence; the current model keeps serving.
"""

from __future__ import annotations

from edgeslim.components.common.errors import FleetError


class ApplyFailed(FleetError):
    """This manifest cannot be applied here: its sequence is recorded as ``failed``, never retried."""


class IntegrityError(ApplyFailed):
    """A downloaded artifact does not match the manifest's sha256 or size."""


class ArtifactMissing(ApplyFailed):
    """The manifest's artifact is not in the store."""


class LocalDiskError(ApplyFailed):
    """The device's own disk refused a write (full, read-only, too large): the download is discarded."""


class UnsafePath(ApplyFailed):
    """A path in the state directory is a link, not a regular file, or another user's: never followed."""
