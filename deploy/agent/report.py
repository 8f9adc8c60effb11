"""What the device tells its fleet: a signed registration, and status records.

A status says what the device runs, what it last decided or refused, and how fresh its
metadata is. It is written to ``status.json`` in the state directory (for the operator on the
device) and, signed with the device's own key, to the store (for the controller) at every
change of state and, while idle, as a heartbeat.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from edgeslim.components.common.version import __version__
from edgeslim.deploy import signing, trust
from edgeslim.deploy.agent.context import AgentContext
from edgeslim.deploy.agent.disk import atomic_write_json, read_link, read_own
from edgeslim.deploy.agent.errors import UnsafePath
from edgeslim.deploy.agent.metadata import Metadata
from edgeslim.deploy.agent.state import LocalState
from edgeslim.deploy.store import StoreUnavailable

log = logging.getLogger("edgeslim.agent")


class Reporter:
    """Registers the device and publishes its statuses, signed with the device key.

    Args:
        ctx: the device and its store.
        local: the agent's state on disk (the decisions a status reports).
        metadata: the fleet metadata the device follows (its freshness goes into every status).
        device_key: the device's own ed25519 private key.
    """

    def __init__(self, ctx: AgentContext, local: LocalState, metadata: Metadata, device_key) -> None:
        self.ctx, self.local, self.metadata = ctx, local, metadata
        self.device_key = device_key
        self.public_key = trust.public_b64(device_key)
        self.last_heartbeat = 0.0  # when a status last reached the store
        self.registered = False

    def status(self, state: str, **extra: Any) -> dict[str, Any]:
        """The status record for ``state`` (``idle``, ``downloading``, ``checking``, ``offline``) plus ``extra``."""
        ctx, data = self.ctx, self.local.data
        cur = read_link(ctx.current_link)
        meta = {}
        if cur:
            try:
                meta = json.loads(read_own(ctx.state_dir / cur / "release.json"))
            except (OSError, ValueError, UnsafePath):
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
        st = {
            "device_id": ctx.device_id, "device_class": ctx.device_class, "fleet": ctx.fleet,
            "agent_version": __version__, "state": state, "heartbeat_at": ctx.clock(),
            "applied_sequence": data.get("applied_sequence", 0),
            "rollout_id": (data.get("manifest") or {}).get("rollout_id"),
            "current": {"sha256": meta.get("sha256"), "backend": meta.get("backend"),
                        "fallback": meta.get("fallback"), "model": meta.get("model")} if cur else None,
            "last": data.get("last"), "rejected": data.get("rejected"),
            "metadata": self.metadata.report(),
        }
        st.update(extra)
        return st

    def write_local(self, state: str, **extra: Any) -> dict[str, Any]:
        """Write the status to ``status.json`` only (a full disk is logged); returns it."""
        st = self.status(state, **extra)
        try:
            atomic_write_json(self.ctx.state_dir / "status.json", st)
        except OSError as exc:  # a full disk: the store still hears what happened
            log.warning("could not write status.json (%s)", exc.strerror or exc)
        return st

    def publish(self, state: str = "idle", **extra: Any) -> None:
        """Write the status to ``status.json`` and, signed, to the store (an unreachable store is logged)."""
        st = self.write_local(state, **extra)
        try:
            # Signed with the device's own key: nobody else can speak for this device.
            self.ctx.store.put_json(self.ctx.keys.status(self.ctx.device_id), trust.sign_with(st, [self.device_key]))
            self.last_heartbeat = self.ctx.clock()
        except StoreUnavailable as exc:
            log.warning("could not publish status (%s); will retry", exc)

    def register(self) -> None:
        """Publish the device's signed registration: its class and public key, for the operator to enrol."""
        ctx = self.ctx
        ctx.store.put_json(ctx.keys.registration(ctx.device_id), trust.sign_with({
            "device_id": ctx.device_id, "device_class": ctx.device_class, "fleet": ctx.fleet,
            "agent_version": __version__, "hostname": socket.gethostname(), "registered_at": ctx.clock(),
            "public_key": self.public_key, "root_version": self.metadata.root.version,
        }, [self.device_key]))
        self.registered = True
        log.info("registered %s/%s (class %s) at %s; device key fingerprint %s (check it when you enrol it)",
                 ctx.fleet, ctx.device_id, ctx.device_class, ctx.store.describe(),
                 signing.key_id(self.device_key.public_key()))
