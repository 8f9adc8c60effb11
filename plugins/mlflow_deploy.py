"""MLflow deployment target ``edge``: staged, signed rollouts to an edge fleet.

Registered as the ``edge`` entry point of the ``mlflow.deployments`` group, so::

    mlflow deployments create -t edge:/FLEET --name ROLLOUT -m models:/NAME@edge-candidate \\
        -C waves=1,10,50,100 -C max_failure_pct=10 -C wave_timeout_s=600

Everything here delegates to :mod:`edgeslim.deploy.controller`, the same code
as ``edgeslim fleet ...``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

from mlflow.deployments import BaseDeploymentClient

from edgeslim.components.common.errors import ConfigError

# -C keys that select where the fleet lives, not how the rollout moves.
_LOCATION_KEYS = ("store", "endpoint_url", "signing_key", "root", "approver_key")


def _quiet_client_loggers() -> None:
    """botocore logs request headers (the access key id, the signature) at DEBUG: with the
    plugin running inside an application that logs at DEBUG, keep them out, as the CLI and
    the agent do."""
    import logging

    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def target_help() -> str:
    return """\
Target `edge:/FLEET`: a signed, staged rollout of an edgeslim edge model to a fleet of devices
running `edgeslim-agent`, with fleet state in S3 (or a local directory).

Where the fleet lives (environment, or -C for the non-secret ones):
  EDGESLIM_FLEET_STORE        s3://bucket/prefix or a directory     (-C store=...)
  EDGESLIM_S3_ENDPOINT_URL    for S3-compatible servers (RGW, MinIO) (-C endpoint_url=...)
  EDGESLIM_FLEET_SIGNING_KEY  the fleet (director) private key PEM    (-C signing_key=PATH)
  EDGESLIM_FLEET_ROOT         the fleet's root document, root.json   (-C root=PATH)
  EDGESLIM_APPROVER_KEY       an approver private key PEM, for -C action=approve (-C approver_key=PATH)
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE: S3 credentials. Never pass
  credentials with -C: they are refused, because -C values reach logs and MLflow.

Operations:
  create   -m models:/NAME@ALIAS (or /VERSION): resolve the alias, check its release statement,
           record the rollout and return; a background controller (`edgeslim fleet reconcile`,
           its log under ~/.edgeslim/rollouts/) sends manifests in waves (canary first), aborts
           and rolls back past the threshold, moves edge-canary after the canary wave, promotes
           as -C promote= says, and on success moves edge-stable. `get` follows it. -C wait=true
           runs it here to the end (through a soak or an approval wait), and fails with the
           reason when the rollout aborts.
  update   -m another version under the same deployment name; -C action=abort to stop a
           running rollout and roll every touched device back (edge-canary goes back too);
           -C action=approve to approve a rollout that is awaiting-approval (signed by the approver
           key): with the fleet key set, a background controller promotes it and runs its
           remaining waves at once.
  delete   withdraw: every device the rollout touched goes back to its previous model.
  get/list rollout state, per-wave and per-device outcomes, what each device runs now.
  predict  run the deployment's model locally through the edgeslim_edge pyfunc; --input-path FILE
           holds {"inputs": [sample, ...]} or a list of samples, each nested as the model's
           input (e.g. 1x8x8), or rows of flat numbers, one per sample.
  run-local  roll out to one simulated device on this machine (a local store and agent).

Config (-C KEY=VALUE):
  waves=1,10,50,100      cumulative % of the fleet per wave; the first is the canary (>= 1 device)
  max_failure_pct=10     abort when failed/reported devices exceed this percentage ...
  min_reported=1         ... once at least this many devices have reported
  wave_timeout_s=600     a device silent this long counts as failed
  poll_interval_s=2      expiry_s=604800   atol=0.001   rtol=0.001   latency_budget_ms=None
  health_repeats=5       device_class=None (all)   canary_alias=edge-canary   stable_alias=edge-stable
  lock_ttl_s=900         wait=false (true: run the waves here and fail if the rollout aborts)
  promote=auto           after the canary wave: auto (go on at once), soak (wait soak_s while the
                         canaries keep reporting; one that fails or goes silent aborts), or approval
                         (wait, state awaiting-approval, for -C action=approve / `edgeslim fleet approve`)
  soak_s=3600            the soak time of promote=soak, from the end of the canary wave
"""


def _fleet_of(target_uri: str) -> str:
    prefix = "edge:/"
    if not target_uri.startswith(prefix) or not target_uri[len(prefix):].strip("/"):
        raise ConfigError(f"target {target_uri!r}: expected edge:/FLEET, e.g. edge:/jetson-orin-lab")
    return target_uri[len(prefix):].strip("/")


def _split(config: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    config = dict(config or {})
    loc = {k: config.pop(k) for k in _LOCATION_KEYS if k in config}
    return loc, config


class EdgeDeploymentClient(BaseDeploymentClient):
    """``mlflow.deployments.get_deploy_client("edge:/FLEET")``."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        self.fleet = _fleet_of(target_uri)

    def _controller(self, loc: dict[str, Any], need_key: bool = False):
        from edgeslim.deploy.fleet_cli import open_controller

        _quiet_client_loggers()
        return open_controller(self.fleet, store=loc.get("store"), endpoint_url=loc.get("endpoint_url"),
                               signing_key=loc.get("signing_key"), need_key=need_key, root=loc.get("root"))

    @staticmethod
    def _view(c, rec) -> dict[str, Any]:
        from edgeslim.deploy.controller import fleet_summary

        out = fleet_summary(c, rec)
        out["flavor"] = "edgeslim_edge"
        return out

    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        from edgeslim.deploy.controller import WaveRolloutConfig
        from edgeslim.deploy.fleet_cli import split_config

        if flavor not in (None, "edgeslim_edge"):
            raise ConfigError(f"flavor {flavor!r}: the edge target deploys the edgeslim_edge flavor only")
        loc, raw = _split(config)
        raw, wait = split_config(raw, default_wait=False)
        c = self._controller(loc, need_key=True)
        rec = c.create(name, model_uri, WaveRolloutConfig.from_strings(raw), wait=wait)
        return self._ended(c, rec) if wait else self._in_background(c, rec, loc)

    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        from edgeslim.deploy.controller import WaveRolloutConfig
        from edgeslim.deploy.fleet_cli import split_config

        loc, raw = _split(config)
        raw, wait = split_config(raw, default_wait=False)
        action = str(raw.pop("action", "")).lower()
        c = self._controller(loc, need_key=action != "approve")  # an approval needs the approver key, not the fleet's
        if action == "abort":
            return self._view(c, c.abort(name, str(raw.pop("reason", "aborted by request"))))
        if action == "approve":
            return self._approved(c, name, loc)
        if action:
            raise ConfigError(f"-C action={action}: expected abort or approve")
        rec = c.get(name)
        cfg = WaveRolloutConfig.from_strings({**rec["config"], **raw}) if rec else None
        rec = c.update(name, model_uri, cfg, wait=wait)
        return self._ended(c, rec) if wait else self._in_background(c, rec, loc)

    def _approved(self, c, name, loc) -> dict[str, Any]:
        """``-C action=approve``: write the approval; with the fleet key here, a detached controller
        (as ``create`` starts) promotes the rollout and runs its remaining waves; without it, the
        controller holding the fleet lock or the next ``reconcile`` does (``approved`` says which)."""
        from edgeslim.deploy.controller import approved_next
        from edgeslim.deploy.fleet_cli import SIGNING_KEY_ENV, approved_line, load_approver_key

        rec = c.approve(name, approver_key=load_approver_key(loc.get("approver_key")))
        if loc.get("signing_key") or os.environ.get(SIGNING_KEY_ENV):
            log = start_controller(self.fleet, loc)
            out = self._view(c, rec)
            out["approved"] = approved_line(rec, f"approved; a controller started here promotes it (log {log})")
            out["controller_log"] = str(log)
            return out
        out = self._view(c, rec)
        out["approved"] = approved_line(rec, approved_next(c, rec) + f" (no fleet key here: set {SIGNING_KEY_ENV} "
                                        "to promote it with this command)")
        return out

    def _ended(self, c, rec) -> dict[str, Any]:
        """``-C wait=true``: the rollout ran here; an aborted or failed one fails the command."""
        from mlflow.exceptions import MlflowException

        if rec["state"] not in ("succeeded",):
            raise MlflowException(f"rollout {rec['name']!r} {rec['state']}: {rec.get('reason')}")
        return self._view(c, rec)

    def _in_background(self, c, rec, loc) -> dict[str, Any]:
        """Hand the recorded rollout to a detached controller and return at once."""
        out = self._view(c, rec)
        out["controller_log"] = str(start_controller(self.fleet, loc))
        return out

    def delete_deployment(self, name, config=None, endpoint=None):
        loc, _ = _split(config)
        c = self._controller(loc, need_key=True)
        c.withdraw(name)

    def list_deployments(self, endpoint=None):
        c = self._controller({})
        return [{"name": r["name"], "state": r["state"], "model": r["model"], "flavor": "edgeslim_edge"}
                for r in c.list()]

    def get_deployment(self, name, endpoint=None):
        from edgeslim.components.common.errors import FleetError

        c = self._controller({})
        rec = c.get(name)
        if rec is None:
            raise FleetError(f"no deployment {name!r} in fleet {self.fleet!r}")
        return self._view(c, rec)

    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        from mlflow.deployments import PredictionsResponse

        from edgeslim.deploy.fleet_cli import predict

        return PredictionsResponse(predict(self._controller({}), deployment_name, inputs))

    def explain(self, deployment_name=None, df=None, endpoint=None):
        raise NotImplementedError("the edge target has no explain; use predict")


def start_controller(fleet: str, loc: dict[str, Any]):
    """Start ``edgeslim fleet reconcile FLEET`` detached (its own session): it runs the recorded
    rollout to the end whether or not this command is still there. Returns its log file."""
    import subprocess
    import sys
    from pathlib import Path

    log_dir = Path(os.environ.get("EDGESLIM_HOME") or Path.home() / ".edgeslim") / "rollouts"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{fleet}.log"
    args = [sys.executable, "-m", "edgeslim", "fleet", "reconcile", fleet]
    for flag, key in (("--store", "store"), ("--endpoint-url", "endpoint_url"), ("--signing-key", "signing_key"),
                      ("--root", "root")):
        if loc.get(key):
            args += [flag, str(loc[key])]
    with open(log, "ab") as fh:
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True)
    return log


def run_local(name, model_uri, flavor=None, config=None):
    """Roll ``model_uri`` out to one simulated device on this machine and report it.

    Uses a fresh local store, throw-away root, release and fleet keys (the release key
    signs the version's statement here, and only if its recorded gate passed) and an
    in-process agent; returns (and prints) the rollout summary once the device has decided.
    """
    import json

    from edgeslim.deploy import release, signing, trust
    from edgeslim.deploy.agent.device import Agent, AgentSettings
    from edgeslim.deploy.controller import Controller, WaveRolloutConfig
    from edgeslim.deploy.store import LocalStore

    _quiet_client_loggers()
    raw = {k: v for k, v in (config or {}).items() if k not in _LOCATION_KEYS}
    device_class = str(raw.pop("device_class", "local"))
    raw.setdefault("poll_interval_s", "0.2")
    raw.setdefault("wave_timeout_s", "120")
    raw.pop("wait", None)
    root = tempfile.mkdtemp(prefix=f"edgeslim-run-local-{name}-")
    keys = {role: signing.load_private_key(signing.generate_keypair(os.path.join(root, "keys"), role=role)[0])
            for role in ("root", "release", "fleet")}
    trusted = trust.Root(trust.make_root(root_keys=[keys["root"]], release_keys=[keys["release"]],
                                         fleet_keys=[keys["fleet"]], fleet="local"))
    store = LocalStore(os.path.join(root, "store"))
    agent = Agent(store=store, fleet="local", device_id="device-0", device_class=device_class,
                  state_dir=os.path.join(root, "device-0"), root=trusted,
                  settings=AgentSettings(poll_interval=0.1, heartbeat_interval=1.0))
    agent.register()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        c = Controller(store, "local", signing_key=keys["fleet"], root=trusted)
        c.enrol("device-0", device_class, agent.public_key)
        c.targets.sign_missing_release = lambda mdir, ref: json.dumps(trust.sign_with(release.statement_for_dir(
            mdir, name=ref.name, version=ref.version, run_id=ref.run_id), [keys["release"]]))
        rec = c.create(name, model_uri, WaveRolloutConfig.from_strings(
            {"waves": "100", "canary_alias": "none", "stable_alias": "none", **raw}))
    finally:
        agent.stop()
        thread.join(timeout=10)
    from edgeslim.deploy.controller import fleet_summary

    summary = fleet_summary(c, rec)
    summary["device_state_dir"] = os.path.join(root, "device-0")
    print(json.dumps(summary, indent=2, default=str))
    return summary
