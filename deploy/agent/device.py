"""The device agent: pull, verify, swap, health-check, commit or roll back.

Runs on each device (``edgeslim-agent`` or ``python -m edgeslim.deploy.agent.device``,
systemd unit in ``deploy/systemd/``). It imports no torch, mlflow or kfp; the
health check runs in a child process, so the idle agent holds only the store
client.

On disk, under ``--state-dir``::

    objects/sha256/<hex>      verified artifacts (content-addressed, read-only)
    partial/<hex>.part        downloads in progress (resumed with Range requests)
    releases/<name>/          model.onnx (+ model.engine) hard-linked from objects
    current -> releases/...   what the application loads; swapped with rename(2)
    previous -> releases/...  the one before, for rollback
    agent.json                last applied sequence and manifests (atomic writes)
    sequence-floor            the replay floor again, written before agent.json (survives losing it)
    swap.json                 the swap journal: exists only while a swap is undecided
    roots/<N>.root.json       newer roots this device accepted
    device.key                the device's own key (mode 0600)

Nothing there is followed through a link or read from another user's file (``disk.py``); with the
whole directory lost, the fleet's signed sequence statement keeps replays out (``metadata.py``).

Every step is either a rename or idempotent, so a SIGKILL anywhere leaves
``current`` on a complete, verified release; start-up undoes an undecided swap
(and the manifest is then applied again from the start).

:class:`Agent` ties together its parts, one per concern, over one
:class:`~edgeslim.deploy.agent.context.AgentContext`: ``state.py`` (agent.json and the replay
floor), ``metadata.py`` (the fleet's root and timestamp, the device clock), ``fetch.py`` (the
manifest and the artifacts), ``install.py`` (releases, the swap, rollback, recovery) and
``report.py`` (registration and statuses). This module holds the poll loop and ``main()``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from edgeslim.components.common.errors import ConfigError, EdgeslimError
from edgeslim.components.common.version import __version__

from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.agent.context import AgentContext, AgentSettings
from edgeslim.deploy.agent.disk import read_link
from edgeslim.deploy.agent.errors import ApplyFailed
from edgeslim.deploy.agent.fetch import ArtifactFetcher, ManifestReader
from edgeslim.deploy.agent.install import Installer
from edgeslim.deploy.agent.metadata import Metadata
from edgeslim.deploy.agent.report import Reporter
from edgeslim.deploy.agent.state import LocalState
from edgeslim.deploy.manifest import Manifest
from edgeslim.deploy.store import ObjectStore, StoreUnavailable, open_store

log = logging.getLogger("edgeslim.agent")

ENV_PREFIX = "EDGESLIM_AGENT_"


def _one_line(exc: BaseException, limit: int = 400) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


class Agent:
    """One device. ``run()`` loops forever; ``step()`` does one poll (for tests and --once).

    Args:
        store: the fleet store.
        fleet, device_id, device_class: who this device is.
        state_dir: where it keeps its releases and state (made if missing).
        root: the fleet's provisioned :class:`~edgeslim.deploy.trust.Root`; newer roots are followed.
        settings: how it polls, downloads and health-checks.
    """

    def __init__(self, *, store: ObjectStore, fleet: str, device_id: str, device_class: str,
                 state_dir: str | Path, root: "trust.Root", settings: AgentSettings = AgentSettings()) -> None:
        self.ctx = AgentContext(store, fleet, device_id, device_class, Path(state_dir), settings)
        self.local = LocalState(self.ctx)
        # The device's own identity: statuses and the registration are signed with it.
        device_key = trust.load_or_make_device_key(self.ctx.state_dir / "device.key")
        # The provisioned root, then every newer root this device accepted before (kept on disk).
        self.metadata = Metadata(self.ctx, self.local, root)
        self.reporter = Reporter(self.ctx, self.local, self.metadata, device_key)
        self.manifests = ManifestReader(self.ctx, self.local, self.metadata)
        self.installer = Installer(self.ctx, self.local, ArtifactFetcher(self.ctx), self.reporter)
        self.failures = 0
        self.store_ok = True
        self._held: tuple[str, str] | None = None  # why the manifest is held now (logged once)
        self._stop = False

    # ----------------------------------------------------------------- what callers reach through the agent
    @property
    def store(self) -> ObjectStore:
        return self.ctx.store

    @store.setter
    def store(self, store: ObjectStore) -> None:
        self.ctx.store = store

    @property
    def settings(self) -> AgentSettings:
        return self.ctx.settings

    @settings.setter
    def settings(self, settings: AgentSettings) -> None:
        self.ctx.settings = settings

    @property
    def device_id(self) -> str:
        return self.ctx.device_id

    @property
    def device_class(self) -> str:
        return self.ctx.device_class

    @property
    def state_dir(self) -> Path:
        return self.ctx.state_dir

    @property
    def state(self) -> dict[str, Any]:
        """``agent.json``: the last applied sequence, manifest, decision and refusal."""
        return self.local.data

    @property
    def root(self) -> trust.Root:
        """The newest root this device trusts."""
        return self.metadata.root

    @property
    def device_key(self):
        return self.reporter.device_key

    @property
    def public_key(self) -> str:
        return self.reporter.public_key

    def now(self) -> float:
        return self.metadata.now()

    def recover(self) -> None:
        self.installer.recover()

    def make_release(self, m: Manifest) -> str:
        return self.installer.make_release(m)

    def register(self) -> None:
        self.reporter.register()

    def publish_status(self, state: str = "idle", **extra: Any) -> None:
        self.reporter.publish(state, **extra)

    # ----------------------------------------------------------------- poll loop
    def _refuse(self, reason: str, message: str, etag: str | None, remember: bool) -> str:
        """Record a refused manifest (status ``rejected``); the current model keeps serving.

        With ``remember`` the next polls send its ETag (nothing to read until it changes); without, they
        read it again, and the same refusal of the same object is not logged or reported again.
        """
        self.manifests.etag = etag if remember else None
        seen = self.state.get("rejected") or {}
        if not remember and (seen.get("etag"), seen.get("reason")) == (etag, reason):
            return "unchanged"
        log.error("refused manifest: %s", message)
        self.state["rejected"] = {"reason": reason, "message": message, "etag": etag, "at": self.ctx.clock()}
        self.local.save()
        self.publish_status("idle")
        return "rejected"

    def _hold(self, reason: str, message: str) -> str:
        """Install nothing now, and read the manifest again next poll (its ETag is not kept): what is
        missing (a verified root chain, the fleet's sequence statement) may come. One line per new reason."""
        self.manifests.etag = None
        if self._held == (reason, message):
            return "held"
        self._held = (reason, message)
        log.error("holding manifest: %s", message)
        self.state["rejected"] = {"reason": reason, "message": message, "etag": None, "at": self.ctx.clock()}
        self.local.save()
        self.publish_status("idle")
        return "held"

    def _check_floor(self, m: Manifest, etag: str | None) -> str | None:
        """The fleet's checks before ``m`` is installed: the root chain, and the fleet's signed sequence
        statement (required by a device with no replay floor of its own; for one with a floor, a fresh
        statement also refuses a manifest the fleet has since superseded). Returns the step's outcome
        when ``m`` must not be installed, else None."""
        problem = self.metadata.chain_problem()
        if problem:
            return self._hold("root", problem)
        try:
            floor = self.metadata.fleet_floor()
        except signing.SignatureError as exc:
            if not self.state.get("applied_sequence", 0):
                return self._hold("no-floor", f"this device has no replay floor of its own (new, or its state was "
                                              f"lost) and {exc}; installs nothing until a fresh one verifies")
            # Its own floor already refused anything at or below the last sequence it applied.
            log.debug("no fresh sequence statement (%s); the device's own floor stands", exc)
            floor = 0
        self._held = None
        if m.sequence < floor:
            return self._refuse("replay", f"manifest sequence {m.sequence} is below {floor}, the sequence the fleet's "
                                          "signed sequence statement names for this device: replayed or stale", etag,
                                remember=True)
        return None

    def _fail(self, m: Manifest, digest: str, reason: str, etag: str | None) -> str:
        """Mark ``m``'s sequence failed (it is not retried: the controller sends a new one)."""
        self.state["last"] = {"sequence": m.sequence, "rollout_id": m.rollout_id, "action": m.action,
                              "result": "failed", "reason": reason, "at": self.ctx.clock(),
                              "sha256": m.artifact.sha256 if m.artifact else None, "manifest_sha256": digest}
        self.state["applied_sequence"] = m.sequence
        self.state["manifest_sha256"] = digest
        self.local.save()
        self.manifests.etag = etag
        self.publish_status("idle")
        return "failed"

    def step(self) -> str:
        """One poll: returns what happened (``unchanged``, ``none``, ``applied``, ``rejected``...)."""
        if not self.reporter.registered:
            self.register()
        self.metadata.follow_root()
        self.metadata.follow_timestamp()
        reading = self.manifests.read()
        if reading.outcome == "rejected":
            return self._refuse(reading.reason, reading.message, reading.etag, reading.remember)
        m = reading.manifest
        if m is None:
            return reading.outcome
        held = self._check_floor(m, reading.etag)
        if held:
            return held
        try:
            last = self.installer.apply(m, reading.digest)
        except ApplyFailed as exc:
            log.error("%s", exc)
            return self._fail(m, reading.digest, str(exc), reading.etag)
        self.manifests.etag = reading.etag
        self.publish_status("idle")
        return "applied" if last["result"] == "committed" else last["result"]

    def _after_error(self, exc: Exception, delay: float) -> None:
        """Undo a swap the failed poll left undecided, and say what happened (best effort)."""
        try:
            self.recover()
        except Exception as rexc:
            log.error("recovery after the failed poll failed too (%s)", _one_line(rexc))
        try:
            self.publish_status("idle", error=f"{type(exc).__name__}: {_one_line(exc)}",
                                retry_in_s=round(delay, 2))
        except Exception as pexc:
            log.warning("could not publish status (%s)", _one_line(pexc))

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self, *, once: bool = False) -> int:
        """Poll until stopped (SIGTERM) or, with ``once``, until one poll succeeded."""
        try:
            self.recover()
        except Exception as exc:  # damaged local state: report it, keep polling (the next manifest may fix it)
            log.error("start-up recovery failed (%s: %s); polling anyway", type(exc).__name__, _one_line(exc))
            log.debug("traceback of the failed recovery", exc_info=True)
        backoff = self.settings.poll_interval
        while not self._stop:
            try:
                what = self.step()
                if not self.store_ok:
                    log.info("store reachable again")
                self.store_ok, self.failures, backoff = True, 0, self.settings.poll_interval
                if what in ("unchanged", "none", "held") and \
                        self.ctx.clock() - self.reporter.last_heartbeat >= self.settings.heartbeat_interval:
                    self.publish_status("idle")
                if once:
                    return 0
                delay = self.settings.poll_interval
            except StoreUnavailable as exc:
                self.failures += 1
                self.store_ok = False
                # Exponential backoff with jitter; the current model keeps serving meanwhile.
                backoff = min(self.settings.max_backoff, backoff * 2)
                delay = backoff * random.uniform(0.5, 1.0)
                cur = read_link(self.ctx.current_link)
                log.warning("store unreachable (%s); still serving %s; retry %d in %.2fs", exc, cur or "nothing",
                            self.failures, delay)
                self.reporter.write_local("offline", store_error=str(exc), retry_in_s=round(delay, 2))
                if once:
                    return 1
            except Exception as exc:  # a bug or a hostile input in one poll must not take the device down
                self.failures += 1
                backoff = min(self.settings.max_backoff, backoff * 2)
                delay = backoff * random.uniform(0.5, 1.0)
                log.error("poll failed (%s: %s); still serving %s; retry %d in %.2fs", type(exc).__name__,
                          _one_line(exc), read_link(self.ctx.current_link) or "nothing", self.failures, delay)
                log.debug("traceback of the failed poll", exc_info=True)
                self._after_error(exc, delay)
                if once:
                    return 1
            deadline = time.monotonic() + delay
            while not self._stop and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        log.info("stopped")
        return 0


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeslim-agent",
        description="edgeslim device agent: pulls signed manifests, installs verified models, "
                    "health-checks them and rolls back on its own. Every option can also be set "
                    "as EDGESLIM_AGENT_<OPTION> (e.g. EDGESLIM_AGENT_DEVICE_ID). S3 credentials "
                    "come from the usual AWS environment variables or profile.",
    )
    p.add_argument("--version", action="version", version=f"edgeslim-agent {__version__}")
    p.add_argument("--store", default=_env("store") or os.environ.get("EDGESLIM_FLEET_STORE"),
                   help="s3://bucket/prefix or a directory")
    p.add_argument("--endpoint-url", default=_env("endpoint_url") or os.environ.get("EDGESLIM_S3_ENDPOINT_URL"),
                   help="S3 endpoint for S3-compatible servers")
    p.add_argument("--fleet", default=_env("fleet"), help="the fleet this device belongs to (required)")
    p.add_argument("--device-id", default=_env("device_id") or socket.gethostname(),
                   help="this device's id in the fleet (default: the host name)")
    p.add_argument("--device-class", default=_env("device_class"),
                   help="exact device class key, e.g. orin-sm87-jp6.1-trt10.3")
    p.add_argument("--state-dir", default=_env("state_dir", "/var/lib/edgeslim-agent"),
                   help="where its releases, device key and state live (default %(default)s)")
    p.add_argument("--root", default=_env("root"),
                   help="the fleet's root document (root.json from `edgeslim fleet root-init`), installed at "
                        "provisioning; newer roots signed by it are followed from the store")
    p.add_argument("--poll-interval", type=float, default=float(_env("poll_interval", 5.0)),
                   help="seconds between polls of the store for a new manifest (default %(default)s)")
    p.add_argument("--heartbeat-interval", type=float, default=float(_env("heartbeat_interval", 30.0)),
                   help="seconds between status reports while idle (default %(default)s)")
    p.add_argument("--max-backoff", type=float, default=float(_env("max_backoff", 300.0)),
                   help="longest wait in seconds between retries while the store is unreachable "
                        "(default %(default)s)")
    p.add_argument("--max-download-rate", type=float, default=float(_env("max_download_rate", 0)) or None,
                   help="cap downloads at this many bytes per second (metered links)")
    p.add_argument("--health-timeout", type=float, default=float(_env("health_timeout", 120.0)),
                   help="seconds a new model's health check may take before it counts as failed "
                        "(default %(default)s)")
    p.add_argument("--max-manifest-bytes", type=int,
                   default=int(_env("max_manifest_bytes", bounded.MAX_MANIFEST_BYTES)),
                   help="refuse a manifest over this size unread (default %(default)s)")
    p.add_argument("--once", action="store_true", help="poll once, apply what is there, exit")
    p.add_argument("--log-level", default=_env("log_level", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edgeslim-agent``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s edgeslim-agent[{args.device_id}] %(levelname)s %(message)s")
    # botocore logs request headers (signatures) at DEBUG: never let that reach our log. (Without boto3 the
    # store uses edgeslim's own S3 client, which logs no headers; quieting absent loggers costs nothing.)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        for name in ("fleet", "device_class", "store", "root"):
            if not getattr(args, name):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} is required (or set {ENV_PREFIX}{name.upper()})")
        store = open_store(args.store, endpoint_url=args.endpoint_url, timeout_s=5.0)
        if getattr(store, "client", None):
            log.info("S3 through %s", "boto3" if store.client == "boto3" else "edgeslim's own S3 client")
        agent = Agent(
            store=store,
            fleet=args.fleet, device_id=args.device_id, device_class=args.device_class,
            state_dir=args.state_dir, root=trust.load_root(args.root)[0],
            settings=AgentSettings(poll_interval=args.poll_interval, heartbeat_interval=args.heartbeat_interval,
                                   max_backoff=args.max_backoff, max_download_rate=args.max_download_rate,
                                   health_timeout=args.health_timeout, max_manifest_bytes=args.max_manifest_bytes),
        )
        signal.signal(signal.SIGTERM, agent.stop)
        signal.signal(signal.SIGINT, agent.stop)
        return agent.run(once=args.once)
    except EdgeslimError as exc:
        print(f"edgeslim-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
