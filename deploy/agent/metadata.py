"""The fleet's signed metadata as the device follows it: the root, the timestamp, and the clock they bound.

The device starts from the root it was provisioned with and accepts each newer root that the
store holds, signed by the old root role and by its own (kept under ``roots/``). The fleet's
short-lived signed timestamp says how fresh the metadata is and puts a floor under the
device's clock, so a device whose clock is far behind still sees manifests expire.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.agent.context import AgentContext
from edgeslim.deploy.agent.disk import atomic_write_json
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
        (ctx.state_dir / "roots").mkdir(exist_ok=True)
        try:
            self.root, _ = trust.update_root(root, self._local_root)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:  # disk damage: the store has them too
            log.error("a root kept in %s is unreadable (%s); starting from the provisioned root version %d",
                      ctx.state_dir / "roots", exc, root.version)
            self.root = root
        self.timestamp_etag: str | None = None
        self.error: str | None = None  # why the last root or timestamp was refused
        self._timestamp_seen = time.monotonic()  # when the kept timestamp was seen (this process: since start)

    def _local_root(self, version: int) -> Any:
        try:
            return bounded.loads((self.ctx.state_dir / "roots" / f"{version}.root.json").read_bytes(),
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
            self.error = f"refused a new root: {exc}"
            log.error("%s", self.error)
            return
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
            self.error = f"refused the fleet timestamp: {exc}"
            log.error("%s", self.error)
            self.timestamp_etag = blob.etag
            return
        state = self.local.data
        known = state.get("timestamp") or {}
        self.timestamp_etag = blob.etag
        if int(ts["version"]) < int(known.get("version", 0)):
            self.error = (f"fleet timestamp version {ts['version']} is older than {known.get('version')}: "
                          "replayed; kept the newer one")
            log.error("%s", self.error)
            return
        if int(ts["version"]) > int(known.get("version", 0)):
            state["timestamp"] = {k: ts[k] for k in ("version", "issued_at", "expires_at", "root_version")}
            self.local.save()
            self._timestamp_seen = time.monotonic()
        self.error = None

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
