"""The fleet's signed metadata as the device follows it: the root, the timestamp, the sequence
statement, and the clock they bound.

The device starts from the root it was provisioned with and accepts each newer root that the
store holds, signed by the old root role and by its own (kept under ``roots/``). The fleet's
short-lived signed timestamp says how fresh the metadata is and puts a floor under the
device's clock, so a device whose clock is far behind still sees manifests expire.

Before it installs anything, the device asks :meth:`Metadata.chain_problem`: a root chain that
breaks (a newer root that does not verify, a gap, a timestamp that names a newer root or does
not verify under the device's root) means no install, whatever key signed the manifest. A
device with no replay floor of its own (new, or its state lost) asks :meth:`Metadata.fleet_floor`
for the fleet's short-lived signed sequence statement, and installs nothing without one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.agent.context import AgentContext
from edgeslim.deploy.agent.disk import atomic_write_json, read_own
from edgeslim.deploy.agent.errors import UnsafePath
from edgeslim.deploy.agent.state import LocalState
from edgeslim.deploy.store import NotModified

log = logging.getLogger("edgeslim.agent")


class Metadata:
    """The newest root this device trusts, and the newest fleet timestamp it has seen (kept in ``agent.json``).

    Args:
        ctx: the device and its store.
        local: the agent's state on disk.
        root: the provisioned root; newer roots this device accepted before are read from ``roots/``.
    """

    def __init__(self, ctx: AgentContext, local: LocalState, root: trust.Root) -> None:
        self.ctx, self.local = ctx, local
        try:
            self.root, _ = trust.update_root(root, self._local_root)
        except (signing.SignatureError, bounded.BoundedInputError, UnsafePath) as exc:
            # disk damage (the store has them too), or a file planted where a root is kept
            log.error("a root kept in %s is refused (%s); starting from the provisioned root version %d",
                      ctx.state_dir / "roots", exc, root.version)
            self.root = root
        self.timestamp_etag: str | None = None
        self.root_error: str | None = None  # why the last walk of the root chain stopped short
        self.timestamp_error: str | None = None  # why the last timestamp was refused
        self.timestamp_root: int | None = None  # the root version the newest verified timestamp names
        self._timestamp_seen = time.monotonic()  # when the kept timestamp was seen (this process: since start)

    @property
    def error(self) -> str | None:
        """Why the last root or timestamp was refused (None: both followed)."""
        return self.root_error or self.timestamp_error

    def _local_root(self, version: int) -> Any:
        try:
            return bounded.loads(read_own(self.ctx.state_dir / "roots" / f"{version}.root.json"),
                                 what=f"local root version {version}")
        except FileNotFoundError:
            return None

    def _store_root(self, version: int) -> Any:
        blob = self.ctx.store.get(self.ctx.keys.root(version), max_bytes=bounded.MAX_SMALL_BYTES)
        return None if blob is None else bounded.loads(blob.data, what=f"root version {version}")

    def follow_root(self) -> None:
        """Accept newer roots from the store: each signed by the old root role and by its own."""
        try:
            self.root, accepted = trust.update_root(self.root, self._store_root)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            error = f"refused a new root (version {self.root.version + 1}): {exc}"
            if error != self.root_error:  # one line per new problem, not one per poll
                log.error("%s", error)
            self.root_error = error
            return
        self.root_error = None
        for env in accepted:
            v = env["signed"]["version"]
            atomic_write_json(self.ctx.state_dir / "roots" / f"{v}.root.json", env)
            log.warning("accepted root version %d (keys rotated)", v)

    def follow_timestamp(self) -> None:
        """Read the fleet's signed timestamp: freshness of the metadata, and a floor for the clock."""
        try:
            blob = self.ctx.store.get(self.ctx.keys.timestamp, if_none_match=self.timestamp_etag,
                                      max_bytes=bounded.MAX_SMALL_BYTES)
        except NotModified:
            return
        if blob is None:
            return
        try:
            ts = trust.verify_timestamp(bounded.loads(blob.data, what="fleet timestamp"), self.root,
                                        fleet=self.ctx.fleet)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            self.timestamp_error = f"refused the fleet timestamp: {exc}"
            self.timestamp_root = None
            log.error("%s", self.timestamp_error)
            self.timestamp_etag = blob.etag
            return
        state = self.local.data
        known = state.get("timestamp") or {}
        self.timestamp_etag = blob.etag
        self.timestamp_root = int(ts.get("root_version") or 0)
        if int(ts["version"]) < int(known.get("version", 0)):
            self.timestamp_error = (f"fleet timestamp version {ts['version']} is older than {known.get('version')}: "
                                    "replayed; kept the newer one")
            log.error("%s", self.timestamp_error)
            return
        if int(ts["version"]) > int(known.get("version", 0)):
            state["timestamp"] = {k: ts[k] for k in ("version", "issued_at", "expires_at", "root_version")}
            self.local.save()
            self._timestamp_seen = time.monotonic()
        self.timestamp_error = None

    def chain_problem(self) -> str | None:
        """Why nothing may be installed now because the root chain is broken, or None.

        Fail closed: a newer root that does not verify, a newer root in the store that the walk
        did not reach (a gap), a fleet timestamp that names a newer root, or one that does not
        verify under this device's root (its fleet key was rotated out of what the device
        knows) each mean the device may be trusting a retired key.
        """
        have = self.root.version
        if self.root_error:
            return f"{self.root_error}; installs nothing until the root chain verifies"
        newer = []
        for key in self.ctx.store.list(self.ctx.keys.root(have).rsplit("/", 1)[0] + "/"):
            try:
                v = int(key.rsplit("/", 1)[-1].split(".", 1)[0])
            except ValueError:
                continue
            if v > have:
                newer.append(v)
        if newer:
            return (f"root version {max(newer)} is in the store but the chain from version {have} stops: "
                    f"root/{have + 1} is missing; installs nothing until the chain verifies")
        if self.timestamp_error and self.timestamp_error.startswith("refused the fleet timestamp"):
            return (f"{self.timestamp_error} (this device trusts root version {have}: a newer root may have "
                    "rotated the fleet key); installs nothing until they agree")
        if self.timestamp_root and self.timestamp_root > have:
            return (f"the fleet timestamp names root version {self.timestamp_root}; this device reached only "
                    f"version {have} (root/{have + 1} is missing from the store): installs nothing until it verifies")
        return None

    def fleet_floor(self) -> int:
        """This device's sequence in the fleet's signed sequence statement (0 when it names none).

        Raises ``signing.SignatureError`` when the statement is missing, expired, unreadable or
        not the fleet role's: a device that has no floor of its own then installs nothing.
        """
        try:
            blob = self.ctx.store.get(self.ctx.keys.sequences, max_bytes=bounded.MAX_MANIFEST_BYTES)
        except bounded.BoundedInputError as exc:
            raise signing.SignatureError(f"sequence statement refused: {exc}") from None
        if blob is None:
            raise signing.SignatureError(f"no sequence statement at {self.ctx.keys.sequences} (the controller "
                                         "publishes it with the fleet timestamp)")
        try:
            envelope = bounded.loads(blob.data, what="sequence statement", max_bytes=bounded.MAX_MANIFEST_BYTES)
        except bounded.BoundedInputError as exc:
            raise signing.SignatureError(str(exc)) from None
        st = trust.verify_sequences(envelope, self.root, fleet=self.ctx.fleet, now=self.now())
        return int(st["sequences"].get(self.ctx.device_id, 0))

    def now(self) -> float:
        """This device's clock, never earlier than the newest signed timestamp it has seen plus the
        time that has passed since (by the monotonic clock): a device clock far behind, with no
        fresh timestamp coming, still sees manifests and the timestamp itself expire."""
        issued = float((self.local.data.get("timestamp") or {}).get("issued_at", 0.0))
        return max(self.ctx.clock(), issued + (time.monotonic() - self._timestamp_seen) if issued else 0.0)

    def report(self) -> dict[str, Any]:
        """What the device knows of its metadata's freshness (goes into every status)."""
        ts = self.local.data.get("timestamp") or {}
        clock = self.ctx.clock()
        issued = float(ts.get("issued_at", 0.0))
        return {"root_version": self.root.version, "timestamp_version": ts.get("version"),
                "stale": not ts or float(ts.get("expires_at", 0.0)) <= self.now(),
                "clock_behind_s": round(issued - clock, 1) if issued - clock > 60 else 0.0,
                "error": self.error}
