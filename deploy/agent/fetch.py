"""What the device fetches from the store: its manifest, verified, and the artifacts it names, checked.

The manifest is read bounded (a larger one is refused unread, a nesting bomb refused on
parsing), verified against the fleet's root, and checked against the replay floor. Artifacts
are downloaded into ``partial/`` (resumed with Range requests, optionally rate-capped),
checked against the manifest's sha256 and size, and moved into the content-addressed
``objects/sha256/`` read-only. An object already there is hashed again before it is used: a
file planted under the right name is removed and downloaded afresh, never installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from edgeslim.deploy import bounded
from edgeslim.deploy.agent.context import AgentContext
from edgeslim.deploy.agent.disk import disk_error, fsync_dir, open_own, own_sha256, remove_path, sha256_fd
from edgeslim.deploy.agent.errors import ArtifactMissing, IntegrityError, UnsafePath
from edgeslim.deploy.agent.metadata import Metadata
from edgeslim.deploy.agent.state import LocalState
from edgeslim.deploy.manifest import Artifact, Manifest, ManifestRejected, manifest_digest, verify_manifest
from edgeslim.deploy.store import NoSuchObject, NotModified

log = logging.getLogger("edgeslim.agent")


@dataclasses.dataclass(frozen=True)
class ManifestReading:
    """What one read of the device's manifest found.

    Attributes:
        outcome: ``unchanged`` (nothing new), ``none`` (no manifest), ``rejected`` or ``new``.
        etag: the ETag of the manifest read (None when nothing was read).
        manifest: the verified manifest to apply (``new`` only).
        digest: the sha256 of its signed payload (``new`` only).
        reason, message: why it was refused (``rejected`` only): a short reason and one line.
        remember: whether to poll past this ETag. Not for a manifest refused as ``malformed``
            (not JSON, or its fields wrong): a body cut short on the way reads so, and the next poll
            must read it again rather than be told "not modified" until a new manifest is written.
    """

    outcome: str
    etag: str | None = None
    manifest: Manifest | None = None
    digest: str | None = None
    reason: str | None = None
    message: str | None = None
    remember: bool = True


class ManifestReader:
    """Reads this device's manifest, sending the ETag of the last one dealt with (:attr:`etag`).

    Args:
        ctx: the device and its store.
        local: the agent's state on disk (the replay floor and the applied manifest's digest).
        metadata: the fleet metadata (the root that verifies, the clock that expires).
    """

    def __init__(self, ctx: AgentContext, local: LocalState, metadata: Metadata) -> None:
        self.ctx, self.local, self.metadata = ctx, local, metadata
        self.etag: str | None = None

    def read(self) -> ManifestReading:
        """One read: unchanged, none, refused, or a verified manifest newer than the replay floor."""
        ctx, state = self.ctx, self.local.data
        try:
            blob = ctx.store.get(ctx.keys.manifest(ctx.device_id), if_none_match=self.etag,
                                 max_bytes=ctx.settings.max_manifest_bytes)
        except NotModified:
            return ManifestReading("unchanged")
        except bounded.BoundedInputError as exc:  # over the cap: refused from its size, never read
            return ManifestReading("rejected", getattr(exc, "etag", None), reason=exc.reason, message=str(exc))
        if blob is None:
            return ManifestReading("none")
        try:
            envelope = bounded.loads(blob.data, what="manifest", max_bytes=ctx.settings.max_manifest_bytes)
        except bounded.BoundedInputError as exc:  # a nesting bomb, or not JSON
            return ManifestReading("rejected", blob.etag, reason=exc.reason, message=str(exc),
                                   remember=exc.reason != "malformed")
        try:
            m = verify_manifest(envelope, self.metadata.root, fleet=ctx.fleet, device_id=ctx.device_id,
                                device_class=ctx.device_class,
                                last_sequence=state.get("applied_sequence", 0), now=self.metadata.now())
        except ManifestRejected as exc:
            signed = envelope.get("signed") if isinstance(envelope, dict) else None
            if exc.reason == "replay" and isinstance(signed, dict) and \
                    signed.get("sequence") == state.get("applied_sequence"):
                known, got = state.get("manifest_sha256"), manifest_digest(signed)
                if known is None or known == got:
                    self.etag = blob.etag  # the manifest we already applied: nothing to do
                    return ManifestReading("unchanged")
                exc = ManifestRejected(
                    "equivocation", f"manifest sequence {signed['sequence']} was already applied with other "
                                    f"content (payload sha256 {known[:12]}, this one {got[:12]}): two different "
                                    "signed manifests under one sequence; the signing key may be misused")
            return ManifestReading("rejected", blob.etag, reason=exc.reason, message=str(exc),
                                   remember=exc.reason != "malformed")
        return ManifestReading("new", blob.etag, manifest=m, digest=manifest_digest(envelope["signed"]))


class ArtifactFetcher:
    """Puts verified artifacts into the device's object store (``objects/sha256/<hex>``)."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx

    def fetch(self, art: Artifact) -> Path:
        """Make sure the verified object is in the local store; download (with resume) if not."""
        state_dir = self.ctx.state_dir
        obj = state_dir / "objects" / "sha256" / art.sha256
        if self._have(obj, art):
            return obj
        part = state_dir / "partial" / f"{art.sha256}.part"
        try:
            return self._download(art, part, obj)
        except NoSuchObject:
            raise ArtifactMissing(f"artifact {art.key} is not in the store {self.ctx.store.describe()}: upload it "
                                  f"and send a new manifest (still serving the current model)") from None
        except OSError as exc:
            # The device's own disk refused: drop the partial file (it is what filled the disk).
            try:
                remove_path(part)
            except OSError:
                pass
            raise disk_error(exc, state_dir, art, f"downloading {art.sha256[:12]}") from None

    @staticmethod
    def _have(obj: Path, art: Artifact) -> bool:
        """Whether the verified object is there: the agent's own file, hashing to its name."""
        if not os.path.lexists(obj):
            return False
        try:
            got = own_sha256(obj)
            if got == art.sha256:
                return True
            why = f"hashes to {got[:12]}, not to its name"
        except (UnsafePath, OSError) as exc:
            why = str(exc)
        log.warning("objects/sha256/%s refused (%s): planted or damaged; removed it, downloading it again",
                    art.sha256[:12], why)
        remove_path(obj)
        return False

    def _open_partial(self, part: Path) -> int:
        """The partial download, opened to append: the agent's own file, never through a link."""
        try:
            return open_own(part, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except UnsafePath as exc:
            log.warning("refused the partial download (%s); removed it, downloading from the start", exc)
            remove_path(part)
            return open_own(part, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)

    def _download(self, art: Artifact, part: Path, obj: Path) -> Path:
        settings = self.ctx.settings
        fd = self._open_partial(part)
        with os.fdopen(fd, "r+b") as fh:
            have = os.fstat(fd).st_size
            if have > art.size:
                os.ftruncate(fd, 0)
                have = 0
            if have:
                log.info("resuming download of %s at byte %d of %d", art.sha256[:12], have, art.size)
            else:
                log.info("downloading %s (%d bytes)", art.sha256[:12], art.size)
            if have < art.size:
                t0, got = time.monotonic(), 0
                for chunk in self.ctx.store.stream(art.key, start=have, chunk_size=settings.chunk_size):
                    fh.write(chunk)
                    got += len(chunk)
                    if have + got > art.size:
                        break
                    if settings.max_download_rate:
                        # Bandwidth cap for metered links: sleep until we are back under the rate.
                        ahead = got / settings.max_download_rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                fh.flush()
                os.fsync(fd)
            size = os.fstat(fd).st_size
            digest = sha256_fd(fd)
            if size != art.size or digest != art.sha256:
                remove_path(part)
                raise IntegrityError(
                    f"artifact {art.key}: got {size} bytes with sha256 {digest[:12]}; manifest says "
                    f"{art.size} bytes, {art.sha256[:12]} (discarded the download)"
                )
            os.fchmod(fd, 0o444)
        os.replace(part, obj)
        fsync_dir(obj.parent)
        log.info("verified %s (%d bytes)", art.sha256[:12], art.size)
        return obj
