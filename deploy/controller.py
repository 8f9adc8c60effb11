"""The rollout controller: alias in MLflow -> signed manifests in waves -> aliases moved.

One rollout (an ``mlflow deployments`` deployment of target ``edge:/FLEET``)
is a record in the fleet store. The controller:

1. resolves ``models:/NAME@ALIAS`` (or ``/VERSION``) in MLflow and uploads the
   edge model's ONNX (and any engines per device class) content-addressed;
2. takes the per-fleet lock with a create-once conditional PUT;
3. writes signed manifests wave by wave (canary first), each device's sequence
   number one above anything it has seen;
4. waits for each wave's statuses with a timeout, a silent device counting as
   failed, and aborts once ``min_reported`` devices have reported and the failure
   share is above ``max_failure_pct``: every device it touched then gets a new,
   higher-sequence manifest back to its previous artifact;
5. moves ``edge-canary`` after the canary wave (the version it pointed at is kept in the
   record, and put back if the rollout aborts), then promotes as ``-C promote=`` says:
   ``auto`` goes on at once, ``soak`` waits ``soak_s`` while the canaries keep reporting, and
   ``approval`` waits (``awaiting-approval``) for an approval object (``edgeslim fleet approve``);
6. on success moves ``edge-stable`` and tags the model version.

The rollout record is rewritten after every step, so ``get`` shows progress and
``reconcile`` (a Kubernetes CronJob) can resume a rollout whose controller died.
MLflow is imported only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common import progress
from edgeslim.components.common.config import Config
from edgeslim.components.common.errors import ConfigError, FleetError, SourceError
from edgeslim.components.common.hashing import file_sha256
from edgeslim.components.common.tracking import parse_model_uri
from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.manifest import Manifest, artifact_key, decode_array, encode_array, manifest_digest
from edgeslim.deploy.store import FleetKeys, ObjectStore, PreconditionFailed, check_name

log = logging.getLogger("edgeslim.controller")

TERMINAL = ("succeeded", "aborted", "withdrawn", "failed")
WAITING = ("soaking", "awaiting-approval")  # after the canary wave, before promotion
ACTIVE = ("pending", "running", "aborting", *WAITING)
PROMOTE = ("auto", "soak", "approval")
APPROVAL_TYPE = "edgeslim.fleet.approval"
POLICY_TYPE = "edgeslim.fleet.policy"
# A signed policy written to the store this much later than it was signed is an old one put back.
POLICY_REPLAY_SLACK_S = 900.0
TAG_PREFIX = "edgeslim.fleet"
KFP_RUN_TAG = "edgeslim.kfp_run_id"  # written on the version by the pipeline's report task
ROOT_ENV = "EDGESLIM_FLEET_ROOT"
DEFAULT_TIMESTAMP_TTL_S = 24 * 3600.0
MAX_LOCK_TTL_S = 3600.0
MAX_EXPIRY_S = 30 * 24 * 3600.0  # a manifest is never valid longer (a stored record cannot stretch it)
MAX_RECORD_BYTES = bounded.MAX_MANIFEST_BYTES + (8 << 20)
# Config keys that look like secrets are refused: -C values end up in shell history and logs.
_SECRET_WORDS = ("secret", "password", "access_key", "token", "credential", "session_key")


@dataclasses.dataclass(frozen=True)
class WaveRolloutConfig(Config):
    """How a rollout moves through the fleet.

    Attributes:
        waves: cumulative percentages of the fleet per wave; the first wave is the
            canary and always has at least one device; a last wave of 100 is implied.
        max_failure_pct: abort when failed/reported devices exceed this percentage.
        min_reported: ...but only once at least this many devices have reported.
        wave_timeout_s: a device silent this long after its manifest counts as failed.
        poll_interval_s: how often the controller reads statuses.
        expiry_s: manifests expire this long after signing (against freeze attacks).
        atol, rtol: tolerance of the golden-output health check on devices.
        iou, score_tol: for a detector, the health check compares decoded detections
            instead: each golden box needs a same-class box at this IoU whose score is
            within ``score_tol`` (int8 engines and ONNX Runtime differ in raw maps, not boxes).
        latency_budget_ms: the device's median latency must stay under this (None: no budget).
        health_repeats: timed runs of the golden input.
        device_class: roll out only to devices of this class (None: all classes).
        canary_alias, stable_alias: moved on success (None: leave aliases alone).
        lock_ttl_s: a lock not renewed for this long may be taken over.
        promote: after the canary wave, ``auto`` goes on at once; ``soak`` waits ``soak_s``
            seconds while the canaries keep reporting (one that fails or is silent for
            ``wave_timeout_s`` counts as failed, against ``max_failure_pct``); ``approval``
            waits for ``edgeslim fleet approve`` (state ``awaiting-approval``).
        soak_s: the soak time of ``promote=soak``, from the canary wave's end.
    """

    waves: list[float] = dataclasses.field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    max_failure_pct: float = 10.0
    min_reported: int = 1
    wave_timeout_s: float = 600.0
    poll_interval_s: float = 2.0
    expiry_s: float = 7 * 24 * 3600.0
    atol: float = 1e-3
    rtol: float = 1e-3
    iou: float = 0.9
    score_tol: float = 0.05
    latency_budget_ms: float | None = None
    health_repeats: int = 5
    device_class: str | None = None
    canary_alias: str | None = "edge-canary"
    stable_alias: str | None = "edge-stable"
    lock_ttl_s: float = 900.0
    promote: str = "auto"
    soak_s: float = 3600.0

    def validate(self) -> None:
        if not self.waves:
            raise ConfigError("waves: empty; give cumulative percentages such as 1,10,50,100")
        prev = 0.0
        for w in self.waves:
            if not 0 < w <= 100 or w < prev:
                raise ConfigError(f"waves: {self.waves} must rise within (0, 100], e.g. 1,10,50,100")
            prev = w
        self.require(0 <= self.max_failure_pct <= 100, "max_failure_pct", "expected 0..100")
        self.require(0 < self.iou <= 1, "iou", "expected an IoU in (0, 1], e.g. 0.9")
        self.require(0 <= self.score_tol < 1, "score_tol", "expected a score difference in [0, 1), e.g. 0.05")
        self.require(self.min_reported >= 1, "min_reported", "expected >= 1")
        for name in ("wave_timeout_s", "poll_interval_s", "expiry_s", "lock_ttl_s"):
            self.require(getattr(self, name) > 0, name, "expected a positive number of seconds")
        self.require(self.expiry_s <= MAX_EXPIRY_S, "expiry_s", f"at most {MAX_EXPIRY_S:.0f} s (30 days)")
        self.require(self.lock_ttl_s <= MAX_LOCK_TTL_S, "lock_ttl_s", f"at most {MAX_LOCK_TTL_S:.0f} s")
        self.require(self.promote in PROMOTE, "promote", "expected auto, soak or approval")
        self.require(self.soak_s >= 0, "soak_s", "expected a number of seconds >= 0")

    @classmethod
    def from_strings(cls, raw: dict[str, Any]) -> "WaveRolloutConfig":
        """From ``-C key=value`` strings (MLflow CLI) or already-typed values."""
        out: dict[str, Any] = {}
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in (raw or {}).items():
            if any(w in key.lower() for w in _SECRET_WORDS):
                raise ConfigError(
                    f"{key}: credentials are never passed as config (they would reach logs and "
                    "MLflow); use the AWS environment variables or a profile"
                )
            if key not in hints or not isinstance(value, str):
                out[key] = value
                continue
            t = str(hints[key])
            try:
                if value.lower() in ("none", "null", ""):
                    out[key] = None
                elif "list" in t:
                    out[key] = [float(v) for v in value.replace(";", ",").split(",") if v.strip()]
                elif "int" in t:
                    out[key] = int(value)
                elif "float" in t:
                    out[key] = float(value)
                else:
                    out[key] = value
            except ValueError:
                raise ConfigError(f"{key}: got {value!r}; expected {t}") from None
        return cls.from_dict(out)


# Keys of the rollout request that are not wave settings.
REQUEST_KEYS = ("wait",)


def approval_key(keys: FleetKeys, name: str) -> str:
    """Written only by whoever approves a rollout (like the abort request); its controller only reads it."""
    return f"{keys.base}/approvals/{check_name('rollout', name)}.json"


def policy_key(keys: FleetKeys) -> str:
    """The fleet's promotion policy, signed by the fleet key (``edgeslim fleet policy``)."""
    return f"{keys.base}/policy.json"


def wave_plan(rollout: str, devices: list[str], waves: list[float]) -> list[list[str]]:
    """Split devices into waves: a stable pseudo-random order, cumulative percentages.

    The order depends on the rollout name, so the canary differs between rollouts
    but the same rollout always plans the same waves (a resumed controller agrees).
    """
    order = sorted(devices, key=lambda d: hashlib.sha256(f"{rollout}/{d}".encode()).hexdigest())
    n, plan, done = len(order), [], 0
    pcts = list(waves) + ([100.0] if waves[-1] < 100 else [])
    for pct in pcts:
        upto = min(n, max(done + 1, math.ceil(pct * n / 100.0)))
        if upto > done:
            plan.append(order[done:upto])
            done = upto
    return plan


@dataclasses.dataclass
class ModelRef:
    name: str
    version: str
    alias: str | None
    run_id: str | None
    uri: str
    release: str | None = None  # the release statement (JSON of a signed envelope) from the version's tag
    kfp_run_id: str | None = None  # the Kubeflow run that compressed it (its register/report tag), if any

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "release"}


def resolve_model(uri: str) -> ModelRef:
    """Resolve an alias to a version in the MLflow registry."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise SourceError(f"{uri}: registered model {name!r} has no {what} ({exc.error_code})") from None
    except Exception as exc:  # connection refused and friends
        raise SourceError(f"{uri}: cannot reach the MLflow registry ({type(exc).__name__})") from None
    tags = mv.tags or {}
    return ModelRef(name=name, version=str(mv.version), alias=alias, run_id=mv.run_id, uri=uri,
                    release=tags.get(trust.RELEASE_TAG), kfp_run_id=tags.get(KFP_RUN_TAG) or None)


def download_model(ref: ModelRef, dst: str | Path) -> Path:
    """Download the version's edge-model directory (model.onnx, edge_meta.json, engines/)."""
    from mlflow.artifacts import download_artifacts

    path = Path(download_artifacts(f"models:/{ref.name}/{ref.version}", dst_path=str(dst)))
    if not (path / "model.onnx").exists():
        raise SourceError(
            f"{ref.uri} (version {ref.version}) has no model.onnx: register it with "
            "edgeslim.plugins.edge_flavor.log_model"
        )
    return path


def golden_check(model_dir: Path, cfg: WaveRolloutConfig) -> dict[str, Any]:
    """The manifest's health check.

    The golden input is, in order of preference: ``edge_meta.json["golden"]`` (input and
    expected outputs recorded by whoever logged the model), the model's MLflow input
    example (real samples; the pipeline logs two calibration images), or a seeded random
    input. Expected outputs not recorded are computed here with ONNX Runtime, which proves
    the device runs *this* model the same way. The model's task (``task`` in the metadata) adds
    what its runtime half compares on the device, and the check records the task: a detector's
    check carries the decoded golden detections and the ``iou``/``score_tol`` tolerances, and the
    device compares boxes, not raw maps.
    """
    import numpy as np

    from edgeslim.components.common.tasks import runtime_for

    meta_path = model_dir / "edge_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    golden = meta.get("golden")
    check: dict[str, Any] = {"atol": cfg.atol, "rtol": cfg.rtol, "latency_budget_ms": cfg.latency_budget_ms,
                             "repeats": cfg.health_repeats}
    if golden:
        x = np.asarray(golden["input"], dtype=np.float32) if not isinstance(golden["input"], dict) \
            else decode_array(golden["input"])
        outs = {k: decode_array(v) if isinstance(v, dict) else np.asarray(v, dtype=np.float32)
                for k, v in golden["outputs"].items()}
        source = "edge_meta.json"
    else:
        from edgeslim.components.common.onnx_runtime import make_session

        sess = make_session(model_dir / "model.onnx")
        inp = sess.get_inputs()[0]
        x, source = _input_example(model_dir, inp), "the model's input example, run by the controller with onnxruntime"
        if x is None:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            source = "a seeded random input, run by the controller with onnxruntime"
        outs = {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, {inp.name: x}))}
    check.update(input=encode_array(x), outputs={k: encode_array(v) for k, v in outs.items()}, source=source)
    # The task the model records adds what its device check compares (a detector's decoded golden boxes).
    meta_task = meta.get("task")
    check.update(runtime_for(meta_task).golden(outs, cfg))
    if meta_task is not None:
        check["task"] = meta_task
    return check


def _input_example(model_dir: Path, inp) -> Any:
    """The MLflow input example saved with the model, as float32 for input ``inp``; else None."""
    import numpy as np

    try:
        from mlflow.models import Model

        ex = Model.load(str(model_dir)).load_input_example(str(model_dir))
    except Exception:  # no example, or one MLflow cannot read back: fall back to a seeded input
        return None
    if isinstance(ex, dict):
        ex = ex.get(inp.name, next(iter(ex.values()), None))
    if ex is None:
        return None
    arr = np.asarray(ex, dtype=np.float32)
    rank = len(inp.shape)
    return arr if arr.ndim == rank else None


class UntrustedRecord(FleetError):
    """A rollout record in the store that this fleet's key did not sign: never acted on."""


class Controller:
    """Rollouts of one fleet.

    Nothing in the store is trusted unless this fleet's root vouches for it: rollout
    records and rollback targets carry the fleet key's signature, device statuses the
    device's own enrolled key, and a model is rolled out only under the release
    statement that the register step signed when it passed its gate.

    Args:
        store: the fleet store.
        fleet: fleet name (``edge:/FLEET``).
        signing_key: the fleet (director) ed25519 private key (needed to write anything).
        root: the fleet's :class:`~edgeslim.deploy.trust.Root` (as provisioned; newer
            versions published in the store are followed).
        clock, sleep: injectable for unit tests of the wave logic.
    """

    def __init__(self, store: ObjectStore, fleet: str, *, signing_key=None, root=None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 timestamp_ttl_s: float = DEFAULT_TIMESTAMP_TTL_S) -> None:
        self.store, self.fleet, self.keys = store, fleet, FleetKeys(fleet)
        self.signing_key = signing_key
        self._root, self._root_followed = root, False
        self.clock, self.sleep = clock, sleep
        self.timestamp_ttl_s = timestamp_ttl_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock_etag: str | None = None
        self._etags: dict[str, str | None] = {}
        # run_local only: signs a throw-away release statement for a version that has none.
        self.sign_missing_release: Callable[[Path, ModelRef], str] | None = None
        self.untrusted: list[str] = []  # record keys found planted, altered or replayed (list, reconcile)
        self._ignored_approvals: set[str] = set()  # etags of approval objects already logged as ignored

    # ------------------------------------------------------------------ trust
    @property
    def root(self):
        """The newest root the provisioned one leads to (walked once per controller)."""
        if self._root is None:
            raise ConfigError("the fleet's root document is needed: pass --root root.json or set "
                              f"{ROOT_ENV} (make it with `edgeslim fleet root init`)")
        if not self._root_followed:
            self._root_followed = True
            for _ in range(trust.MAX_ROOT_STEPS):  # one version at a time: a bad one stops the walk, not us
                try:
                    envelope = self._fetch_root(self._root.version + 1)
                    if envelope is None:
                        break
                    self._root = self._root.successor(envelope)
                except FleetError as exc:
                    log.error("refused root version %d: %s; keeping version %d", self._root.version + 1, exc,
                              self._root.version)
                    break
        return self._root

    def _fetch_root(self, version: int) -> Any:
        blob = self.store.get(self.keys.root(version), max_bytes=bounded.MAX_SMALL_BYTES)
        return None if blob is None else bounded.loads(blob.data, what=f"root version {version}")

    def _require_key(self) -> None:
        if self.signing_key is None:
            raise ConfigError("a fleet signing key is needed to roll out; set EDGESLIM_FLEET_SIGNING_KEY "
                              "or pass --signing-key (make one with `edgeslim fleet keygen --role fleet`)")
        kid = signing.key_id(self.signing_key.public_key())
        if kid not in self.root.roles["fleet"].keyids:
            raise ConfigError(f"signing key {kid} is not a fleet key of root version {self.root.version}; "
                              "use the fleet key the root lists, or rotate the root to add it")

    def _sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        return trust.sign_with(payload, [self.signing_key])

    def _read(self, key: str, what: str, max_bytes: int = bounded.MAX_SMALL_BYTES) -> tuple[Any, str] | None:
        """Bounded read of one untrusted JSON object (size checked before the body is read)."""
        blob = self.store.get(key, max_bytes=max_bytes)
        if blob is None:
            return None
        return bounded.loads(blob.data, what=what, max_bytes=max_bytes), blob.etag

    def _verified(self, key: str, what: str, max_bytes: int = bounded.MAX_SMALL_BYTES) -> tuple[Any, str] | None:
        """An object the fleet key signed, with its etag; raises SignatureError if it is not."""
        got = self._read(key, what, max_bytes)
        if got is None:
            return None
        return self.root.verify(got[0], "fleet", what=what), got[1]

    def publish_timestamp(self) -> dict[str, Any]:
        """A fresh, short-lived signed timestamp: devices report metadata older than it as stale."""
        self._require_key()
        version = int(self.clock())
        try:
            got = self._verified(self.keys.timestamp, "fleet timestamp")
            if got:
                version = max(version, int(got[0].get("version", 0)) + 1)
        except (FleetError, TypeError, ValueError) as exc:
            log.warning("replacing an unreadable fleet timestamp (%s)", exc)
        ts = trust.timestamp_payload(fleet=self.fleet, version=version, root_version=self.root.version,
                                     ttl_s=self.timestamp_ttl_s, now=self.clock())
        self.store.put_json(self.keys.timestamp, self._sign(ts))
        return ts

    # ------------------------------------------------------------------ lock
    def acquire_lock(self, rollout: str, ttl_s: float) -> None:
        """Create-once PUT of the fleet lock; take over only one that the *store's* clock says expired."""
        body = {"rollout": rollout, "holder": self.holder, "ttl_s": float(ttl_s)}
        try:
            self._lock_etag = self.store.put_json(self.keys.lock, body, if_none_match_any=True)
            return
        except PreconditionFailed:
            pass
        aged = self.store.age(self.keys.lock)
        if aged is None:  # released between our PUT and this look: try once more
            self._lock_etag = self.store.put_json(self.keys.lock, body, if_none_match_any=True)
            return
        etag, age = aged
        try:
            held = (self._read(self.keys.lock, "fleet lock") or ({}, ""))[0]
            held = held if isinstance(held, dict) else {}
            held_ttl = min(float(held.get("ttl_s", ttl_s)), MAX_LOCK_TTL_S)
        except (FleetError, TypeError, ValueError):
            held, held_ttl = {}, float(ttl_s)
        if age < held_ttl:
            raise FleetError(
                f"fleet {self.fleet!r} is locked by rollout {held.get('rollout')!r} "
                f"(controller {held.get('holder')}, for another {held_ttl - age:.0f}s by the store's clock); "
                "wait for it, or abort it with `edgeslim fleet abort`"
            )
        try:
            self._lock_etag = self.store.put_json(self.keys.lock, body, if_match=etag)
        except PreconditionFailed:
            raise FleetError(f"fleet {self.fleet!r}: another controller took the expired lock first") from None
        log.warning("took over the expired lock of rollout %s", held.get("rollout"))

    def renew_lock(self, rollout: str, ttl_s: float) -> None:
        body = {"rollout": rollout, "holder": self.holder, "ttl_s": float(ttl_s)}
        try:
            self._lock_etag = self.store.put_json(self.keys.lock, body, if_match=self._lock_etag)
        except PreconditionFailed:
            raise FleetError(f"fleet {self.fleet!r}: lost the lock (another controller took it); stopping") from None

    def release_lock(self) -> None:
        try:
            got = self._read(self.keys.lock, "fleet lock")
        except FleetError:
            got = None
        if got and isinstance(got[0], dict) and got[0].get("holder") == self.holder:
            self.store.delete(self.keys.lock)
        self._lock_etag = None

    # ------------------------------------------------------------------ records
    def get(self, name: str) -> dict[str, Any] | None:
        """The rollout record, verified; raises :class:`UntrustedRecord` for a planted or altered one."""
        key = self.keys.rollout(name)
        try:
            got = self._verified(key, f"rollout record {name!r}", MAX_RECORD_BYTES)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            raise UntrustedRecord(f"{exc}; the record was planted or altered in the store, so it is never acted "
                                  f"on: delete {key}") from None
        if got is None:
            return None
        rec, etag = got
        if rec.get("name") != name or rec.get("fleet") != self.fleet:
            raise UntrustedRecord(f"rollout record {key} is signed for {rec.get('fleet')}/{rec.get('name')}: "
                                  "copied from elsewhere; delete it")
        self._etags[name] = etag
        return rec

    def list(self) -> list[dict[str, Any]]:
        """Every record this fleet signed; the others are logged and counted in ``self.untrusted``."""
        out = []
        self.untrusted = []
        for key in self.store.list(self.keys.rollouts_prefix):
            if key.endswith(".json"):
                try:  # the whole rest of the key: rollouts/sub/r1.json is not r1 (check_name refuses it)
                    rec = self.get(key[len(self.keys.rollouts_prefix):-len(".json")])
                except FleetError as exc:
                    log.error("%s", exc)
                    self.untrusted.append(key)
                    continue
                except ConfigError as exc:  # a planted key that names no rollout must not stop the others
                    log.error("%s: %s; not a rollout record, never acted on: delete it", key, exc)
                    self.untrusted.append(key)
                    continue
                if rec:
                    out.append(rec)
        return out

    def abort_requested(self, rec: dict[str, Any]) -> str | None:
        """The reason of a pending abort request for this generation of the rollout, if any.

        Anyone who can write the store can ask for an abort: that only ever moves devices back
        to gated models they ran before, so an unreadable request counts as one.
        """
        try:
            got = self._read(self.keys.abort_request(rec["name"]), "abort request")
        except FleetError as exc:
            return f"aborted by an unreadable request ({exc})"
        if not got:
            return None
        req = got[0] if isinstance(got[0], dict) else {}
        if req.get("generation", 1) != rec.get("generation", 1):
            return None  # left over from an earlier generation under this name
        return str(req.get("reason") or "aborted by request")[:500]

    # ------------------------------------------------------------------ promotion
    def approve(self, name: str, by: str | None = None) -> dict[str, Any]:
        """Approve the promotion of a rollout that is ``awaiting-approval``: write the approval object.

        Needs no signing key: the approval is a trigger the controller reads, bound to this
        rollout's generation and artifact. Anyone who can write the store can write one, and so
        promote the *gated* (release-signed) model this rollout installs to the rest of the fleet.
        """
        rec = self.get(name)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}; see `edgeslim fleet list`")
        cfg = WaveRolloutConfig.from_dict(rec["config"])
        if rec["state"] in TERMINAL:
            raise FleetError(f"rollout {name!r} is {rec['state']}: nothing to approve")
        if cfg.promote != "approval":
            raise FleetError(f"rollout {name!r} promotes with promote={cfg.promote}, not approval: it waits for "
                             "no approval")
        if rec["state"] != "awaiting-approval":
            raise FleetError(f"rollout {name!r} is {rec['state']}: its canary wave has not finished; approve it "
                             "once `get` shows awaiting-approval")
        if by is None:
            import getpass

            try:
                by = f"{getpass.getuser()}@{socket.gethostname()}"
            except Exception:  # no user name (a container without one)
                by = socket.gethostname()
        body = {"type": APPROVAL_TYPE, "fleet": self.fleet, "rollout": name, "generation": rec.get("generation", 1),
                "artifact_sha256": rec["artifact"]["sha256"], "model": {k: rec["model"].get(k) for k in ("name", "version")},
                "by": str(by)[:200], "at": self.clock()}
        self.store.put_json(approval_key(self.keys, name), body)
        log.info("rollout %s: approved by %s", name, body["by"])
        rec["approval_requested"] = body  # for the caller's display; the object is the truth
        return rec

    def approval(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """The approval of this generation and artifact of the rollout, if one was written.

        Unsigned by design (see :meth:`approve`); one for another rollout, generation or model, or
        one that is not an approval at all, is logged once and ignored.
        """
        key = approval_key(self.keys, rec["name"])
        try:
            got = self._read(key, "approval")
        except (FleetError, ValueError) as exc:
            got, why = None, str(exc)
            if why not in self._ignored_approvals:
                self._ignored_approvals.add(why)
                log.warning("rollout %s: unreadable approval %s ignored: %s", rec["name"], key, why[:300])
        if not got:
            return None
        a, etag = got
        if isinstance(a, dict) and a.get("type") == APPROVAL_TYPE and a.get("fleet") == self.fleet and \
                a.get("rollout") == rec["name"] and a.get("generation") == rec.get("generation", 1) and \
                a.get("artifact_sha256") == rec["artifact"]["sha256"]:
            at = a.get("at")
            return {"by": str(a.get("by"))[:200],
                    "at": at if isinstance(at, (int, float)) and not isinstance(at, bool) else None}
        if etag not in self._ignored_approvals:
            self._ignored_approvals.add(etag)
            log.warning("rollout %s: approval %s ignored: it is not for generation %s of this rollout and model "
                        "(approve again with `edgeslim fleet approve %s %s`)", rec["name"], key,
                        rec.get("generation", 1), self.fleet, rec["name"])
        return None

    def set_policy(self, *, auto_promote: bool) -> dict[str, Any]:
        """Sign and store the fleet's promotion policy (the fleet key: a bucket writer cannot turn it on)."""
        self._require_key()
        pol = {"type": POLICY_TYPE, "fleet": self.fleet, "auto_promote": bool(auto_promote),
               "updated_at": self.clock()}
        self.store.put_json(policy_key(self.keys), self._sign(pol))
        return pol

    def policy(self) -> dict[str, Any]:
        """The fleet's promotion policy as the fleet key signed it; the default (no auto-promotion) otherwise.

        A policy nobody of this fleet signed, or one written to the store well after it was signed
        (an old ``auto_promote: true`` put back after it was turned off), is logged and ignored.
        """
        default = {"type": POLICY_TYPE, "fleet": self.fleet, "auto_promote": False, "updated_at": None}
        key = policy_key(self.keys)
        try:
            got = self._verified(key, "fleet policy")
            if got is None:
                return default
            pol, etag = got
            if pol.get("type") != POLICY_TYPE or pol.get("fleet") != self.fleet:
                raise FleetError(f"it is a {str(pol.get('type'))[:60]} of fleet {str(pol.get('fleet'))[:60]!r}")
            signed_at = pol.get("updated_at")
            aged = self.store.age(key)
            if not isinstance(signed_at, (int, float)) or aged is None or aged[0] != etag:
                raise FleetError("it changed while being read, or carries no signing time")
            if (self.clock() - signed_at) - aged[1] > POLICY_REPLAY_SLACK_S:
                raise FleetError(f"it was signed {self.clock() - signed_at:.0f}s ago but written to the store "
                                 f"{aged[1]:.0f}s ago: an older policy put back")
            return {**default, **pol, "auto_promote": pol.get("auto_promote") is True}
        except (FleetError, AttributeError, TypeError) as exc:
            log.error("fleet policy %s ignored (%s); no auto-promotion: set it again with "
                      "`edgeslim fleet policy %s --auto-promote true|false`", key, str(exc)[:300], self.fleet)
            return dict(default, ignored=str(exc)[:300])

    def _save(self, rec: dict[str, Any]) -> None:
        """Sign and write the record, fenced on the ETag this controller last saw."""
        rec["updated_at"] = self.clock()
        name, key = rec["name"], self.keys.rollout(rec["name"])
        etag = self._etags.get(name)
        try:
            if etag is None:
                new = self.store.put_json(key, self._sign(rec), if_none_match_any=True)
            else:
                new = self.store.put_json(key, self._sign(rec), if_match=etag)
        except PreconditionFailed:
            raise FleetError(f"rollout {name!r}: its record changed under this controller (another controller, "
                             "or a write to the store); stopping without touching devices further") from None
        self._etags[name] = new

    # ------------------------------------------------------------------ devices
    def inventory(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Enrolled devices (id -> class and public key) as the fleet key signed them, and the ETag."""
        try:
            got = self._verified(self.keys.inventory, "device inventory")
        except signing.SignatureError as exc:
            raise signing.SignatureError(f"{exc}; if the root rotated the fleet key, enrol the devices again "
                                         "(`edgeslim fleet enrol FLEET DEVICE`)") from None
        if got is None:
            return {}, None
        inv, etag = got
        if inv.get("type") != trust.INVENTORY_TYPE or inv.get("fleet") != self.fleet:
            raise signing.SignatureError(f"device inventory is for {inv.get('fleet')!r}, not {self.fleet!r}")
        return dict(inv.get("devices") or {}), etag

    def _inventory_for_write(self) -> tuple[dict[str, Any], str | None]:
        """The inventory to enrol into. One that no current fleet key signed (a root rotation retired the
        key that signed it, or it was garbled) is started afresh, fenced on the stored object: every
        device is then enrolled again, from its own signed registration."""
        try:
            return self.inventory()
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            log.warning("device inventory not trusted (%s); starting a new one: enrol every device again", exc)
            head = self.store.head(self.keys.inventory)
            return {}, head[1] if head else None

    def enrol(self, device_id: str, device_class: str | None = None, public_key: str | None = None) -> dict[str, Any]:
        """Add a device to the signed inventory; class and key default to its registration's."""
        self._require_key()
        check_name("device", device_id)
        if public_key is None or device_class is None:
            reg = self.registrations().get(device_id)
            if reg is None:
                raise FleetError(f"device {device_id!r} has not registered in fleet {self.fleet!r}; start its "
                                 "agent first, or pass --class and --public-key")
            public_key = public_key or reg["public_key"]
            device_class = device_class or reg["device_class"]
        trust.public_from_b64(public_key)
        devices, etag = self._inventory_for_write()
        devices[device_id] = {"device_class": device_class, "public_key": public_key, "enrolled_at": self.clock()}
        return self._write_inventory(devices, etag)[device_id]

    def enrol_many(self, entries: dict[str, tuple[str, str]]) -> None:
        """Enrol several devices in one inventory write: ``{device_id: (class, public key b64)}``."""
        self._require_key()
        devices, etag = self._inventory_for_write()
        for dev, (cls, pub) in entries.items():
            check_name("device", dev)
            trust.public_from_b64(pub)
            devices[dev] = {"device_class": cls, "public_key": pub, "enrolled_at": self.clock()}
        self._write_inventory(devices, etag)

    def _write_inventory(self, devices: dict[str, Any], etag: str | None) -> dict[str, Any]:
        inv = {"type": trust.INVENTORY_TYPE, "fleet": self.fleet, "devices": devices, "updated_at": self.clock()}
        try:
            if etag is None:
                self.store.put_json(self.keys.inventory, self._sign(inv), if_none_match_any=True)
            else:
                self.store.put_json(self.keys.inventory, self._sign(inv), if_match=etag)
        except PreconditionFailed:
            raise FleetError("the device inventory changed while enrolling; run the command again") from None
        return devices

    def registrations(self) -> dict[str, dict[str, Any]]:
        """Self-signed registrations, each keyed by the store path it lives under (never by its claim)."""
        regs: dict[str, dict[str, Any]] = {}
        for key in self.store.list(self.keys.devices_prefix):
            if not key.endswith("/registration.json"):
                continue
            dev = key.split("/")[-2]
            try:
                env, _ = self._read(key, f"registration of {dev}") or (None, None)
                if env is None:
                    continue
                claimed = env.get("signed", {}) if isinstance(env, dict) else {}
                reg = trust.verify_device(env, str(claimed.get("public_key")), what=f"registration of {dev}")
                if reg.get("device_id") != dev or reg.get("fleet") != self.fleet:
                    raise FleetError(f"registration under {key} claims {reg.get('fleet')}/{reg.get('device_id')}")
                regs[dev] = reg
            except (FleetError, AttributeError) as exc:
                log.warning("ignoring registration %s: %s", key, exc)
        return regs

    def device_status(self, dev: str, public_key: str) -> dict[str, Any] | None:
        """The device's latest status if its own enrolled key signed it; else ``None`` (logged)."""
        try:
            got = self._read(self.keys.status(dev), f"status of {dev}", bounded.MAX_STATUS_BYTES)
            if got is None:
                return None
            st = trust.verify_device(got[0], public_key, what=f"status of {dev}")
            if st.get("device_id") != dev:
                raise FleetError(f"status signed by {dev}'s key claims to be {st.get('device_id')!r}")
            return st
        except (FleetError, AttributeError) as exc:
            log.warning("device %s: status ignored: %s", dev, exc)
            return None

    def devices(self) -> dict[str, dict[str, Any]]:
        """Enrolled, registered devices with their verified status (``None`` if none yet).

        The device class is the inventory's, never the registration's claim.
        """
        inv, _ = self.inventory()
        regs = self.registrations()
        out: dict[str, dict[str, Any]] = {}
        for dev, entry in sorted(inv.items()):
            reg = regs.get(dev)
            if reg is None:
                continue
            if reg.get("public_key") != entry.get("public_key") or reg.get("device_class") != entry.get("device_class"):
                log.warning("device %s: registration does not match its enrolment (key or class); not a target", dev)
                continue
            out[dev] = {"device_class": entry["device_class"], "public_key": entry["public_key"],
                        "registration": reg, "status": self.device_status(dev, entry["public_key"])}
        return out

    def pending(self) -> dict[str, dict[str, Any]]:
        """Registered devices that are not enrolled yet (for `edgeslim fleet enrol`)."""
        inv, _ = self.inventory()
        return {d: {"device_class": r.get("device_class"), "public_key": r.get("public_key"),
                    "fingerprint": trust.key_id(trust.public_from_b64(r["public_key"]))}
                for d, r in self.registrations().items() if d not in inv}

    # ------------------------------------------------------------------ create
    def prepare(self, name: str, model_uri: str, cfg: WaveRolloutConfig) -> dict[str, Any]:
        """Resolve the model, check its release statement, upload its artifacts, write a pending record."""
        check_name("rollout", name)
        ref = resolve_model(model_uri)
        target = self.prepare_target(ref, cfg)
        now = self.clock()
        return {
            "name": name, "fleet": self.fleet, "state": "pending", "generation": 1,
            "model": ref.to_dict(), "artifact": target["artifact"], "engines": target["engines"],
            "health_check": target["health_check"], "release": target["release"],
            "config": cfg.to_dict(), "waves": [], "devices": {}, "abort_requested": None,
            "reason": None, "created_at": now, "updated_at": now, "history": [],
        }

    def prepare_target(self, ref: ModelRef, cfg: WaveRolloutConfig) -> dict[str, Any]:
        """Everything a manifest needs to install ``ref``, checked against its release statement.

        Only what the release role signed is shipped: the ONNX must be the one it covers, and an
        engine goes to a device class only if the statement lists that exact engine.
        """
        with tempfile.TemporaryDirectory(prefix="edgeslim-rollout-") as tmp:
            mdir = download_model(ref, tmp)
            statement = ref.release or (self.sign_missing_release(mdir, ref) if self.sign_missing_release else None)
            if not statement:
                raise SourceError(f"{ref.uri} (version {ref.version}) carries no release statement (tag "
                                  f"{trust.RELEASE_TAG}): it was not registered through the gate with a release "
                                  f"key; sign it with `edgeslim fleet release models:/{ref.name}/{ref.version}`")
            try:
                rel = trust.verify_release(bounded.loads(statement, what="release statement"), self.root,
                                           now=self.clock())
            except (signing.SignatureError, bounded.BoundedInputError) as exc:
                raise SourceError(f"{ref.uri}: {exc}") from None
            if (rel.name, rel.version) != (ref.name, ref.version):
                raise SourceError(f"{ref.uri}: its release statement is for {rel.name} version {rel.version}; "
                                  "copied from another version: sign this version's own with "
                                  f"`edgeslim fleet release models:/{ref.name}/{ref.version}`")
            onnx = mdir / "model.onnx"
            if (file_sha256(onnx), onnx.stat().st_size) != (rel.sha256, rel.size):
                raise SourceError(f"{ref.uri}: model.onnx is not the file its release statement covers "
                                  f"({rel.sha256[:12]}); it was changed after the gate")
            artifact = self._upload(onnx, "onnx")
            engines = {}
            edir = mdir / "engines"
            if edir.is_dir():
                for cls_dir in sorted(p for p in edir.iterdir() if p.is_dir()):
                    files = sorted(cls_dir.glob("*.engine")) + sorted(cls_dir.glob("*.plan"))
                    if not files:
                        continue
                    want = rel.engines.get(cls_dir.name)
                    if not want or want["sha256"] != file_sha256(files[0]):
                        log.warning("engine %s is not in the release statement: not shipped", cls_dir.name)
                        continue
                    meta_p = cls_dir / "metadata.json"
                    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
                    engines[cls_dir.name] = self._upload(files[0], "tensorrt", meta)
            health = golden_check(mdir, cfg)
        target = {"artifact": artifact, "engines": engines, "model": ref.to_dict(), "health_check": health,
                  "release": rel.envelope}
        return self.put_target(target)

    def put_target(self, target: dict[str, Any]) -> dict[str, Any]:
        """Sign and store what installs one artifact, so a later rollback to it can trust it."""
        self._require_key()
        self.store.put_json(self.keys.target(target["artifact"]["sha256"]), self._sign(target))
        return target

    def target(self, sha256: str) -> dict[str, Any] | None:
        """What installs artifact ``sha256`` (for a rollback to it), as this fleet signed it.

        A target signed by a fleet key that the root no longer lists (a rotation) is derived
        again from MLflow, through the release statement it names, and signed anew.
        """
        key = self.keys.target(sha256)
        try:
            got = self._read(key, f"target {sha256[:12]}", bounded.MAX_MANIFEST_BYTES)
        except FleetError as exc:
            log.error("%s", exc)
            return None
        if got is None:
            return None
        try:
            tgt = self.root.verify(got[0], "fleet", what=f"target {sha256[:12]}")
            if tgt.get("artifact", {}).get("sha256") == sha256:
                return tgt
        except signing.SignatureError:
            pass
        try:  # not (or no longer) ours: only its release statement can be believed
            rel = trust.verify_release(got[0]["signed"]["release"], self.root, now=self.clock())
        except (signing.SignatureError, KeyError, TypeError) as exc:
            log.error("target %s: neither the fleet key nor a release statement vouches for it (%s)", sha256[:12], exc)
            return None
        if rel.sha256 != sha256:
            return None
        log.info("target %s: re-deriving from models:/%s/%s (its fleet signature is not current)",
                 sha256[:12], rel.name, rel.version)
        ref = resolve_model(f"models:/{rel.name}/{rel.version}")
        return self.prepare_target(ref, WaveRolloutConfig())

    def _upload(self, path: Path, fmt: str, metadata: dict | None = None) -> dict[str, Any]:
        sha, size = file_sha256(path), path.stat().st_size
        key = artifact_key(sha)
        head = self.store.head(key)
        if head is None or head[0] != size:
            try:
                self.store.put_file(key, path, if_none_match_any=head is None)
            except PreconditionFailed:
                pass  # uploaded concurrently: content-addressed, so it is the same bytes
        return {"key": key, "sha256": sha, "size": size, "format": fmt, "metadata": metadata or {}}

    def _active_rollouts(self, except_name: str | None = None) -> list[str]:
        return [r["name"] for r in self.list() if r.get("state") in ACTIVE and r["name"] != except_name]

    def create(self, name: str, model_uri: str, cfg: WaveRolloutConfig, *, wait: bool = True,
               block: bool | None = None) -> dict[str, Any]:
        """Start a rollout. ``wait``: run it to the end here; else leave it for ``reconcile``.

        ``block`` (default ``wait``): also wait here through a soak or for an approval; ``False``
        runs the waves but leaves a rollout that reaches its promotion ``soaking`` or
        ``awaiting-approval`` for ``reconcile``.
        """
        self._require_key()
        existing = self.get(name)
        if existing and existing.get("state") not in TERMINAL:
            raise FleetError(f"rollout {name!r} already exists and is {existing['state']}; "
                             "use update, or delete it first")
        if existing:
            raise FleetError(f"rollout {name!r} already exists ({existing['state']}); use `update` "
                             "to roll out another version under this name")
        return self._start(name, model_uri, cfg, wait=wait, block=block, history=[])

    def _start(self, name: str, model_uri: str, cfg: WaveRolloutConfig, *, wait: bool,
               history: list, generation: int = 1, block: bool | None = None) -> dict[str, Any]:
        self.acquire_lock(name, cfg.lock_ttl_s)
        try:
            others = self._active_rollouts(except_name=name)
            if others:
                raise FleetError(f"fleet {self.fleet!r} has an unfinished rollout {others[0]!r}; "
                                 "wait for it or abort it")
            rec = self.prepare(name, model_uri, cfg)
            rec["history"], rec["generation"] = history, generation
            self._save(rec)
            log.info("rollout %s: %s version %s to fleet %s", name, rec["model"]["name"],
                     rec["model"]["version"], self.fleet)
            if not wait:
                return rec
            return self._run_locked(rec, block=wait if block is None else block)
        finally:
            self.release_lock()

    def update(self, name: str, model_uri: str | None, cfg: WaveRolloutConfig | None, *,
               wait: bool = True, block: bool | None = None) -> dict[str, Any]:
        """Roll out another version under an existing rollout name (after the last one ended)."""
        self._require_key()
        rec = self.get(name)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}; create it first")
        if rec["state"] not in TERMINAL:
            raise FleetError(f"rollout {name!r} is {rec['state']}; abort it before updating")
        cfg = cfg or WaveRolloutConfig.from_dict(rec["config"])
        uri = model_uri or rec["model"]["uri"]
        summary = {k: rec.get(k) for k in ("generation", "state", "model", "reason", "updated_at")}
        return self._start(name, uri, cfg, wait=wait, block=block, history=rec.get("history", []) + [summary],
                           generation=rec.get("generation", 1) + 1)

    def abort(self, name: str, reason: str = "aborted by request") -> dict[str, Any]:
        """Ask a running rollout to stop and roll back; roll back here if nobody runs it."""
        rec = self.get(name)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}")
        if rec["state"] in TERMINAL:
            return rec
        self.store.put_json(self.keys.abort_request(name),
                            {"reason": reason, "generation": rec.get("generation", 1), "at": self.clock()})
        try:
            self.acquire_lock(name, WaveRolloutConfig.from_dict(rec["config"]).lock_ttl_s)
        except FleetError:
            log.info("rollout %s: abort requested; its controller will roll back", name)
            rec["abort_requested"] = reason  # for the caller's display; the request object is the truth
            return rec  # the running controller sees the request at its next poll
        try:
            self._require_key()
            rec = self.get(name) or rec
            if rec["state"] not in TERMINAL:
                self._rollback(rec, reason)
                self._tag(rec)
            return rec
        finally:
            self.release_lock()

    def withdraw(self, name: str) -> dict[str, Any]:
        """``delete``: every device this rollout touched goes back to what it ran before it."""
        self._require_key()
        rec = self.get(name)
        if rec is None:
            raise FleetError(f"no rollout {name!r} in fleet {self.fleet!r}")
        if rec["state"] not in TERMINAL:
            rec = self.abort(name, "withdrawn")
            if rec["state"] not in TERMINAL:
                raise FleetError(f"rollout {name!r} is still running elsewhere; it will roll back, "
                                 "delete it again once it has stopped")
        if rec["state"] in ("aborted", "withdrawn"):
            rec["state"] = "withdrawn"
            self._save(rec)
            return rec
        self.acquire_lock(name, WaveRolloutConfig.from_dict(rec["config"]).lock_ttl_s)
        try:
            rec = self.get(name) or rec
            self._rollback(rec, "withdrawn", final_state="withdrawn")
            self._tag(rec)
            return rec
        finally:
            self.release_lock()

    def reconcile(self) -> list[dict[str, Any]]:
        """Run every pending or orphaned rollout of the fleet (the Kubernetes Job/CronJob entry).

        Only records this fleet's key signed are resumed; a planted one is reported and left alone.
        A rollout that is ``soaking`` or ``awaiting-approval`` is checked once (canaries, abort,
        approval, the soak's end) and, still waiting, left for the next run.
        """
        self._require_key()
        self.publish_timestamp()
        done = []
        for rec in self.list():
            if rec.get("state") not in ACTIVE:
                continue
            cfg = WaveRolloutConfig.from_dict(rec["config"])
            try:
                self.acquire_lock(rec["name"], cfg.lock_ttl_s)
            except FleetError as exc:
                log.info("skipping %s: %s", rec["name"], exc)
                continue
            try:
                rec = self.get(rec["name"]) or rec
                ended = self._ended_in_registry(rec)
                if ended:
                    log.error("rollout %s: its record says %s, but MLflow recorded generation %s as %s: an older "
                              "version of the record was put back (a replay); not resumed", rec["name"],
                              rec["state"], ended.get("generation"), ended.get("state"))
                    self.untrusted.append(self.keys.rollout(rec["name"]))
                    continue
                requested = self.abort_requested(rec)
                if requested and rec["state"] in ACTIVE:
                    self._rollback(rec, requested)
                    self._tag(rec)
                    done.append(rec)
                elif rec["state"] in ACTIVE:
                    done.append(self._run_locked(rec, block=False))
            finally:
                self.release_lock()
        return done

    def _ended_in_registry(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """MLflow's record that this generation of the rollout already ended, if it has one.

        A bucket writer can put back an older, validly signed version of a record (``pending``
        after it was aborted, say) and delete the abort request; the model version's tag, which
        the controller writes when a rollout ends, is outside the store and says otherwise.
        """
        m = rec.get("model") or {}
        try:
            tags = self._mlflow().get_model_version(m["name"], m["version"]).tags or {}
            ended = json.loads(tags.get(f"{TAG_PREFIX}.{self.fleet}", "null"))
        except Exception as exc:  # MLflow unreachable: resume (the devices still check every signature)
            log.warning("rollout %s: cannot check its end in MLflow (%s)", rec["name"], type(exc).__name__)
            return None
        if isinstance(ended, dict) and ended.get("rollout") == rec["name"] and \
                ended.get("generation", 1) >= rec.get("generation", 1) and ended.get("state") in TERMINAL:
            return ended
        return None

    # ------------------------------------------------------------------ the waves
    def _current_manifest(self, device: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the device's manifest as this fleet signed it or ``None``, the stored object's ETag)."""
        try:
            blob = self.store.get(self.keys.manifest(device), max_bytes=bounded.MAX_MANIFEST_BYTES)
        except bounded.BoundedInputError as exc:
            log.warning("device %s: stored manifest refused (%s)", device, exc)
            return None, (self.store.head(self.keys.manifest(device)) or (0, None))[1]
        if blob is None:
            return None, None
        try:
            env = bounded.loads(blob.data, what=f"manifest of {device}", max_bytes=bounded.MAX_MANIFEST_BYTES)
            return self.root.verify(env, "fleet", what=f"manifest of {device}"), blob.etag
        except FleetError as exc:
            log.warning("device %s: stored manifest is not this fleet's (%s); treating it as absent", device, exc)
            return None, blob.etag

    def _directed_sha(self, device: str) -> str | None:
        """The artifact of the device's current manifest, as this fleet signed it (None: withdraw/none)."""
        cur, _ = self._current_manifest(device)
        art = (cur or {}).get("artifact") if (cur or {}).get("action") in ("install", "rollback") else None
        return _reported_sha({"current": art}) if isinstance(art, dict) else None

    def _write_manifest(self, rec: dict, device: str, device_class: str, *, action: str,
                        target: dict[str, Any] | None, status: dict[str, Any] | None) -> dict[str, Any]:
        """Sign and write one manifest, fenced on the manifest object this controller read."""
        cur, etag = self._current_manifest(device)
        seqs = [0, _int((cur or {}).get("sequence")), _int((status or {}).get("applied_sequence"))]
        seq = max(seqs) + 1
        now = self.clock()
        cfg = rec["config"]
        target = target or {}
        art = target.get("artifact")
        release = target.get("release")
        expires = now + float(cfg["expiry_s"])
        if release:
            expires = min(expires, float(release["signed"]["expires_at"]))
        before = _reported_sha(status)
        m = Manifest(
            fleet=self.fleet, device_id=device, device_class=device_class, rollout_id=rec["name"],
            sequence=seq, issued_at=now, expires_at=expires, action=action,
            artifact=None if art is None else _artifact(art),
            engine=None if not target.get("engine") else _artifact(target["engine"]),
            model=target.get("model"), health_check=target.get("health_check"),
            previous={"sha256": before} if before else None, release=release,
        )
        env = m.sign(self.signing_key)
        try:
            if etag is None:
                new = self.store.put_json(self.keys.manifest(device), env, if_none_match_any=True)
            else:
                new = self.store.put_json(self.keys.manifest(device), env, if_match=etag)
        except PreconditionFailed:
            raise FleetError(f"device {device}: its manifest changed while this controller wrote it "
                             "(another controller?); stopping") from None
        return {"sequence": seq, "etag": new, "sent_at": now, "action": action,
                "digest": manifest_digest(m.to_dict())}

    def _outcome(self, device: str, sent: dict[str, Any], public_key: str) -> tuple[str, str | None] | None:
        """``(outcome, reason)`` once the device has answered this manifest, else ``None``.

        The answer must come from the device's own key and name this manifest by sequence *and*
        digest. A device that signs junk about itself has failed.
        """
        st = self.device_status(device, public_key)
        if not st:
            return None
        try:
            rej = st.get("rejected") or {}
            if rej.get("etag") == sent["etag"]:
                return "rejected", f"{rej.get('reason')}: {str(rej.get('message'))[:300]}"
            last = st.get("last") or {}
            if last.get("sequence") == sent["sequence"]:
                if sent.get("digest") and last.get("manifest_sha256") != sent["digest"]:
                    return "failed", "the device applied another manifest under this sequence"
                if last.get("result") == "committed":
                    return "committed", None
                return "failed", str(last.get("reason") or last.get("result"))[:500]
            if _int(st.get("applied_sequence")) > sent["sequence"]:
                return "superseded", None
            return None
        except (AttributeError, TypeError) as exc:
            return "failed", f"unreadable status ({type(exc).__name__})"

    def _run_locked(self, rec: dict[str, Any], *, block: bool = True) -> dict[str, Any]:
        """Run (or resume) the rollout under the lock this controller holds.

        ``block``: wait through a soak or for an approval here; else check the promotion once and
        return the record ``soaking`` or ``awaiting-approval`` (``reconcile``, a CronJob, must not
        sit for hours on a gate: its next run checks again).
        """
        cfg = WaveRolloutConfig.from_dict(rec["config"])
        self.publish_timestamp()
        devs = self.devices()
        if cfg.device_class:
            devs = {d: v for d, v in devs.items() if v["device_class"] == cfg.device_class}
        if not devs and not rec["devices"]:
            rec["state"], rec["reason"] = "failed", "no enrolled, registered devices in the fleet"
            self._save(rec)
            raise FleetError(f"fleet {self.fleet!r} has no enrolled, registered devices"
                             + (f" of class {cfg.device_class!r}" if cfg.device_class else "")
                             + "; start edgeslim-agent on the devices and enrol them (`edgeslim fleet enrol`)")
        if not rec["waves"]:
            rec["waves"] = [{"index": i, "devices": w, "state": "planned"}
                            for i, w in enumerate(wave_plan(rec["name"], sorted(devs), cfg.waves))]
        if rec["state"] not in WAITING:
            rec["state"] = "running"
            self._save(rec)
        target_base = {"artifact": rec["artifact"], "model": rec["model"], "health_check": rec["health_check"],
                       "release": rec["release"]}
        for wave in rec["waves"]:
            if wave["state"] == "done":
                if wave["index"] == 0:  # resumed after the canary wave: the promotion decides (again)
                    if cfg.canary_alias and cfg.canary_alias not in (rec.get("aliases") or {}):
                        self._set_alias(rec, cfg.canary_alias)  # stopped before it was moved (or it failed)
                    verdict, passed = self._promotion_gate(rec, cfg, block=block)
                    if verdict is not None:
                        return self._end_aborted(rec, verdict)
                    if not passed:
                        return rec
                continue
            requested = self.abort_requested(rec)
            if requested:
                return self._end_aborted(rec, requested)
            wave["state"], wave["started_at"] = "running", self.clock()
            for dev in wave["devices"]:
                if dev in rec["devices"] or dev not in devs:
                    continue  # resumed: this device already got its manifest (or left the inventory)
                dclass, st = devs[dev]["device_class"], devs[dev]["status"]
                # What it runs: its own signed word, else what this fleet last directed it to run (a
                # status made unreadable must not turn a later rollback into a withdraw).
                before = _reported_sha(st) or self._directed_sha(dev)
                target = dict(target_base, engine=rec["engines"].get(dclass))
                sent = self._write_manifest(rec, dev, dclass, action="install", target=target, status=st)
                rec["devices"][dev] = {"wave": wave["index"], "device_class": dclass, "sent": sent,
                                       "before": before if isinstance(before, str) else None,
                                       "public_key": devs[dev]["public_key"], "outcome": None, "reason": None}
            self._save(rec)
            log.info("rollout %s: wave %d (%d devices) sent", rec["name"], wave["index"], len(wave["devices"]))
            progress.emit("wave", f"rollout {rec['name']}: wave {wave['index'] + 1}/{len(rec['waves'])} sent to "
                                  f"{len(wave['devices'])} device(s)")
            verdict = self._wait_wave(rec, wave, cfg)
            wave["state"], wave["finished_at"] = "done", self.clock()
            self._save(rec)
            verdict = verdict or self.abort_requested(rec)  # an abort after the last report still counts
            if verdict is not None:
                return self._end_aborted(rec, verdict)
            if wave["index"] == 0:
                if cfg.canary_alias:
                    self._set_alias(rec, cfg.canary_alias)
                verdict, passed = self._promotion_gate(rec, cfg, block=block)
                if verdict is not None:
                    return self._end_aborted(rec, verdict)
                if not passed:
                    return rec  # soaking or awaiting-approval; the next reconcile checks again
        requested = self.abort_requested(rec)
        if requested:
            return self._end_aborted(rec, requested)
        rec["state"] = "succeeded"
        self._save(rec)
        if cfg.stable_alias:
            self._set_alias(rec, cfg.stable_alias)
        self._tag(rec)
        log.info("rollout %s succeeded", rec["name"])
        return rec

    def _end_aborted(self, rec: dict[str, Any], reason: str) -> dict[str, Any]:
        rec["abort_requested"] = rec.get("abort_requested") or None
        self._rollback(rec, reason)
        self._tag(rec)
        return rec

    def _tally(self, rec: dict[str, Any]) -> tuple[int, int]:
        outs = [d["outcome"] for d in rec["devices"].values() if d["outcome"]]
        failed = sum(o in ("failed", "rejected", "silent") for o in outs)
        return len(outs), failed

    def _over_threshold(self, rec: dict[str, Any], cfg: WaveRolloutConfig) -> str | None:
        reported, failed = self._tally(rec)
        if reported >= cfg.min_reported and failed * 100.0 / max(reported, 1) > cfg.max_failure_pct:
            return (f"{failed} of {reported} reported devices failed "
                    f"({failed * 100.0 / reported:.0f}% > max_failure_pct {cfg.max_failure_pct:g})")
        return None

    def _wait_wave(self, rec: dict[str, Any], wave: dict[str, Any], cfg: WaveRolloutConfig) -> str | None:
        deadline = self.clock() + cfg.wave_timeout_s
        waiting = [d for d in wave["devices"] if d in rec["devices"] and not rec["devices"][d]["outcome"]]
        last_renew = self.clock()
        while True:
            before = len(waiting)
            for dev in list(waiting):
                d = rec["devices"][dev]
                got = self._outcome(dev, d["sent"], d["public_key"])
                if got:
                    d["outcome"], d["reason"] = got
                    waiting.remove(dev)
                    log.info("rollout %s: %s %s%s", rec["name"], dev, got[0], f" ({got[1]})" if got[1] else "")
            if len(waiting) != before:
                n = len(wave["devices"])
                failed = sum(rec["devices"][d]["outcome"] in ("failed", "rejected", "silent")
                             for d in wave["devices"] if d in rec["devices"])
                progress.emit("wave", f"rollout {rec['name']}: wave {wave['index'] + 1}/{len(rec['waves'])}: "
                                      f"{n - len(waiting)} of {n} reported, {failed} failed, {len(waiting)} remaining")
            requested = self.abort_requested(rec)
            if requested:  # before anything else: an abort is never lost to a finished wave
                rec["abort_requested"] = requested
                return requested
            verdict = self._over_threshold(rec, cfg)
            if verdict:
                return verdict
            if not waiting:
                return None
            if self.clock() >= deadline:
                for dev in waiting:
                    rec["devices"][dev]["outcome"] = "silent"
                    rec["devices"][dev]["reason"] = f"no status within wave_timeout_s={cfg.wave_timeout_s:g}"
                self._save(rec)
                return self._over_threshold(rec, cfg)
            if self.clock() - last_renew > cfg.lock_ttl_s / 3:
                self.renew_lock(rec["name"], cfg.lock_ttl_s)
                self.publish_timestamp()
                last_renew = self.clock()
            self._save(rec)
            self.sleep(cfg.poll_interval_s)

    def _promotion_gate(self, rec: dict[str, Any], cfg: WaveRolloutConfig, *,
                        block: bool) -> tuple[str | None, bool]:
        """After the canary wave: ``(abort reason, None)``, or ``(None, promoted?)``.

        ``soak`` waits until ``soak_s`` after the canary wave ended; ``approval`` until
        :meth:`approval` finds this generation approved. Meanwhile abort requests are honoured,
        the canaries are watched (:meth:`_watch_canaries`), and, when ``block``, the lock is
        renewed and the fleet timestamp refreshed as in a wave. Without ``block`` it checks once.
        """
        p = rec.get("promotion")
        if cfg.promote == "auto" or (p or {}).get("passed_at") is not None:
            return None, True
        if not p:
            wave0 = rec["waves"][0]
            since = float(wave0.get("finished_at") or self.clock())
            watch = {}
            for dev in wave0["devices"]:
                d = rec["devices"].get(dev)
                if d and d.get("outcome") == "committed":
                    st = self.device_status(dev, d["public_key"]) or {}
                    # Silence is counted from now: a gate set up late (a resumed rollout) is not a silence.
                    watch[dev] = {"heartbeat_at": _number(st.get("heartbeat_at")), "seen_at": self.clock()}
            p = rec["promotion"] = {"policy": cfg.promote, "since": since,
                                    "until": since + cfg.soak_s if cfg.promote == "soak" else None,
                                    "approval": None, "passed_at": None, "watch": watch}
        waiting = "soaking" if cfg.promote == "soak" else "awaiting-approval"
        if rec["state"] != waiting:
            rec["state"] = waiting
            self._save(rec)
            log.info("rollout %s: canary wave done; %s", rec["name"],
                     f"soaking for {cfg.soak_s:g}s" if waiting == "soaking" else
                     f"awaiting approval (`edgeslim fleet approve {self.fleet} {rec['name']}`)")
        last_renew = self.clock()
        while True:
            requested = self.abort_requested(rec)
            if requested:
                rec["abort_requested"] = requested
                return requested, False
            verdict = self._watch_canaries(rec, cfg)
            if verdict:
                return verdict, False
            passed = False
            if cfg.promote == "soak":
                passed = self.clock() >= float(p["until"])
            else:
                approved = self.approval(rec)
                if approved:
                    p["approval"], passed = approved, True
            if passed:
                p["passed_at"] = self.clock()
                rec["state"] = "running"
                self._save(rec)
                log.info("rollout %s: promoted (%s)", rec["name"],
                         f"soaked {cfg.soak_s:g}s" if cfg.promote == "soak" else f"approved by {p['approval']['by']}")
                return None, True
            if not block:
                self._save(rec)
                return None, False
            if self.clock() - last_renew > cfg.lock_ttl_s / 3:
                self.renew_lock(rec["name"], cfg.lock_ttl_s)
                self.publish_timestamp()
                self._save(rec)
                last_renew = self.clock()
            self.sleep(cfg.poll_interval_s)

    def _watch_canaries(self, rec: dict[str, Any], cfg: WaveRolloutConfig) -> str | None:
        """While a promotion waits, each committed canary must keep saying (signed) that it runs
        this rollout's manifest and model, and keep heartbeating: a new ``heartbeat_at`` at least
        every ``wave_timeout_s`` by this controller's clock. One that does not counts as failed
        (or silent), against ``max_failure_pct`` as in a wave; returns the abort reason, if any."""
        p, now, changed = rec["promotion"], self.clock(), False
        during = "soak" if p["policy"] == "soak" else "wait for approval"
        for dev, w in p["watch"].items():
            d = rec["devices"].get(dev) or {}
            if d.get("outcome") != "committed":
                continue
            st = self.device_status(dev, d["public_key"])
            bad = None
            if st:
                hb = _number(st.get("heartbeat_at"))
                if hb is not None and (w.get("heartbeat_at") is None or hb > w["heartbeat_at"]):
                    w["heartbeat_at"], w["seen_at"] = hb, now
                bad = _still_ours(st, d["sent"], rec["artifact"]["sha256"])
            if bad:
                d["outcome"], d["reason"] = "failed", f"during the {during}: {bad}"[:500]
            elif now - float(w.get("seen_at") or now) > cfg.wave_timeout_s:
                d["outcome"] = "silent"
                d["reason"] = f"no new status for wave_timeout_s={cfg.wave_timeout_s:g} during the {during}"
            else:
                continue
            changed = True
            log.warning("rollout %s: canary %s %s (%s)", rec["name"], dev, d["outcome"], d["reason"])
        return self._over_threshold(rec, cfg) if changed else None

    def _rollback(self, rec: dict[str, Any], reason: str, final_state: str = "aborted") -> None:
        """Every touched device gets a new, higher-sequence manifest back to what it ran before.

        "Before" is what the device itself (signed) said it ran when this rollout reached it, not
        any manifest's claim. One device that fails here does not stop the others; the record is
        saved after each device.
        """
        log.warning("rollout %s: %s; rolling back %d device(s)", rec["name"], reason, len(rec["devices"]))
        in_flight = rec["state"] != "succeeded"  # a withdrawn, finished rollout leaves the aliases alone
        rec["state"], rec["reason"] = "aborting", reason
        self._save(rec)
        devs = None
        for dev, d in rec["devices"].items():
            if d.get("rolled_back"):
                continue
            try:
                cur, _ = self._current_manifest(dev)
                # A later rollout that only rolled the device back to this rollout's model (it failed or was
                # aborted) does not supersede this one: the device still runs what this rollout installed.
                back_to_ours = bool(cur) and cur.get("action") == "rollback" and \
                    (cur.get("artifact") or {}).get("sha256") == rec["artifact"]["sha256"]
                if cur and cur.get("rollout_id") != rec["name"] and not back_to_ours:
                    d["rolled_back"] = {"skipped": f"superseded by rollout {cur.get('rollout_id')}"}
                    continue
                if devs is None:
                    devs = self.devices()
                st = (devs.get(dev) or {}).get("status")
                before = d.get("before")
                target = self.target(before) if before else None
                if before and target is None:
                    raise FleetError(f"no signed target for what it ran before ({before[:12]}); it keeps its model")
                if target is not None:
                    target = dict(target, engine=(target.get("engines") or {}).get(d["device_class"]))
                d["rolled_back"] = self._write_manifest(rec, dev, d["device_class"],
                                                        action="rollback" if target else "withdraw",
                                                        target=target, status=st)
            except Exception as exc:  # noqa: BLE001 - one device must not strand the others
                log.error("rollout %s: device %s not rolled back: %s", rec["name"], dev, exc)
                d["rolled_back"] = {"error": str(exc)[:500]}
            self._save(rec)
        if in_flight:
            self._restore_aliases(rec)
        rec["state"] = final_state
        self._save(rec)

    # ------------------------------------------------------------------ MLflow
    def _mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient()

    def _set_alias(self, rec: dict[str, Any], alias: str) -> None:
        """Point ``alias`` at the rollout's version; what it pointed at before is saved in the record
        first (``aliases``), so an abort can put it back."""
        m = rec["model"]
        try:
            client = self._mlflow()
            moved = rec.setdefault("aliases", {})
            if alias not in moved:  # a resumed rollout must not record its own version as "before"
                before = (client.get_registered_model(m["name"]).aliases or {}).get(alias)
                moved[alias] = {"before": None if before is None else str(before), "to": str(m["version"])}
                self._save(rec)
            client.set_registered_model_alias(m["name"], alias, m["version"])
            log.info("moved alias %s of %s to version %s", alias, m["name"], m["version"])
        except FleetError:
            raise  # the record could not be saved: another controller; stop
        except Exception as exc:  # the rollout itself stands; say what did not happen
            log.error("could not move alias %s: %s", alias, exc)
            rec.setdefault("warnings", []).append(f"alias {alias} not moved: {type(exc).__name__}")

    def _restore_aliases(self, rec: dict[str, Any]) -> None:
        """After an abort: each alias this rollout moved goes back to the version it pointed at before
        (deleted if there was none), unless it has been moved again since."""
        m = rec["model"]
        for alias, a in (rec.get("aliases") or {}).items():
            if not isinstance(a, dict) or a.get("restored"):
                continue
            try:
                client = self._mlflow()
                now = (client.get_registered_model(m["name"]).aliases or {}).get(alias)
                if now is None or str(now) != str(a.get("to")):
                    a["restored"] = f"left alone: it points at {now} now, not at this rollout's version"
                elif a.get("before"):
                    client.set_registered_model_alias(m["name"], alias, a["before"])
                    a["restored"] = f"back to version {a['before']}"
                else:
                    client.delete_registered_model_alias(m["name"], alias)
                    a["restored"] = "deleted (it pointed at no version before)"
                log.info("rollout %s: alias %s %s", rec["name"], alias, a["restored"])
            except Exception as exc:  # the rollback itself stands; say what did not happen
                log.error("rollout %s: could not restore alias %s: %s", rec["name"], alias, exc)
                rec.setdefault("warnings", []).append(f"alias {alias} not restored: {type(exc).__name__}")

    def _tag(self, rec: dict[str, Any]) -> None:
        m = rec["model"]
        reported, failed = self._tally(rec)
        summary = {"rollout": rec["name"], "generation": rec.get("generation", 1), "state": rec["state"],
                   "devices": len(rec["devices"]), "reported": reported, "failed": failed,
                   "reason": rec.get("reason"), "finished_at": self.clock(),
                   # what made this version: the registration run and, on a cluster, the KFP run
                   **{k: m[k] for k in ("run_id", "kfp_run_id") if m.get(k)}}
        try:
            self._mlflow().set_model_version_tag(m["name"], m["version"], f"{TAG_PREFIX}.{self.fleet}",
                                                 json.dumps(summary, sort_keys=True))
        except Exception as exc:
            log.error("could not tag the model version: %s", exc)


def _int(value: Any) -> int:
    """A sequence number from untrusted JSON: anything that is not a whole number counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) else None


def _still_ours(status: dict[str, Any], sent: dict[str, Any], sha256: str) -> str | None:
    """Why a committed device's signed status says it no longer runs this rollout's model; else None."""
    try:
        applied = _int(status.get("applied_sequence"))
        if applied > sent["sequence"]:
            return f"it applied a later manifest (sequence {applied})"
        last = status.get("last") or {}
        if last.get("sequence") == sent["sequence"] and last.get("result") != "committed":
            return f"it reports {str(last.get('result'))[:60]}: {str(last.get('reason'))[:300]}"
        if _reported_sha(status) != sha256:
            return "it no longer reports running this rollout's model"
        return None
    except (AttributeError, TypeError) as exc:
        return f"unreadable status ({type(exc).__name__})"


def _reported_sha(status: Any) -> str | None:
    """The sha256 a device's status says it runs; ``None`` for anything else (a device may sign junk)."""
    cur = status.get("current") if isinstance(status, dict) else None
    sha = cur.get("sha256") if isinstance(cur, dict) else None
    return sha if isinstance(sha, str) and len(sha) == 64 and all(ch in "0123456789abcdef" for ch in sha) else None


def _artifact(d: dict[str, Any]):
    from edgeslim.deploy.manifest import Artifact

    return Artifact(key=d["key"], sha256=d["sha256"], size=int(d["size"]), format=d.get("format", "onnx"),
                    metadata=d.get("metadata") or {})


def fleet_summary(controller: Controller, rec: dict[str, Any]) -> dict[str, Any]:
    """A rollout as ``get`` shows it: the record plus each device's live state."""
    devs = controller.devices()
    live = {}
    for dev, d in rec.get("devices", {}).items():
        st = (devs.get(dev) or {}).get("status") or {}
        cur = st.get("current") if isinstance(st.get("current"), dict) else {}
        beat = st.get("heartbeat_at")
        live[dev] = {"outcome": d.get("outcome"), "reason": d.get("reason"),
                     "running": str(cur.get("sha256") or "")[:12] or None, "backend": cur.get("backend"),
                     "heartbeat_age_s": round(controller.clock() - beat, 1) if isinstance(beat, (int, float)) else None}
    reported, failed = controller._tally(rec)
    out = {"name": rec["name"], "fleet": rec["fleet"], "state": rec["state"], "reason": rec.get("reason"),
           "model": rec["model"], "generation": rec.get("generation", 1),
           "waves": [{"index": w["index"], "devices": len(w["devices"]), "state": w["state"]} for w in rec["waves"]],
           "reported": reported, "failed": failed, "devices": live,
           "artifact_sha256": rec["artifact"]["sha256"],
           "promote": (rec.get("config") or {}).get("promote", "auto")}
    p = rec.get("promotion")
    if isinstance(p, dict):
        now = controller.clock()
        promo = {k: p.get(k) for k in ("policy", "since", "approval", "passed_at")}
        if rec["state"] == "soaking" and isinstance(p.get("until"), (int, float)):
            promo["soak_left_s"] = round(max(0.0, p["until"] - now), 1)
            promo["next"] = ("promoted once the soak ends; `edgeslim fleet reconcile` (the CronJob) continues it "
                             "if no controller is waiting on it")
        elif rec["state"] == "awaiting-approval":
            promo["waiting_s"] = round(max(0.0, now - float(p.get("since") or now)), 1)
            promo["next"] = (f"edgeslim fleet approve {rec['fleet']} {rec['name']}  (or mlflow deployments update "
                             f"-t edge:/{rec['fleet']} --name {rec['name']} -C action=approve)")
        out["promotion"] = promo
    if rec.get("aliases"):
        out["aliases"] = rec["aliases"]
    return out


def follow_alias(controller: Controller, model: str, alias: str, rollout: str | None = None,
                 raw_config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Start a rollout of the version ``alias`` points at, unless this fleet already has one.

    The entry of the CronJob and of the registry webhook: idempotent, so a
    repeated trigger for the same version does nothing and returns ``None``.

    Promotion is not automatic here unless the fleet opted in: without ``promote`` in
    ``raw_config`` the rollout uses ``promote=auto`` only if the fleet's signed policy says
    ``auto_promote`` (``edgeslim fleet policy FLEET --auto-promote true``), else
    ``promote=approval``. The waves run here, but a soak or an approval is waited for only
    with an explicit ``wait=true``; otherwise the rollout is left for ``reconcile``.
    """
    raw = dict(raw_config or {})
    explicit_wait = "wait" in raw
    wait = raw.pop("wait", True)
    wait = wait if isinstance(wait, bool) else str(wait).lower() in ("true", "1", "yes")
    block = wait if explicit_wait else False
    ref = resolve_model(f"models:/{model}@{alias}")
    for rec in controller.list():
        m = rec.get("model") or {}
        if m.get("name") == ref.name and str(m.get("version")) == ref.version and rec.get("state") != "failed":
            return None
    name = rollout or f"{ref.name}-v{ref.version}"
    name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name)[:128]
    if "promote" not in raw:
        raw["promote"] = "auto" if controller.policy()["auto_promote"] else "approval"
    cfg = WaveRolloutConfig.from_strings(raw)
    log.info("rollout %s: promote=%s%s", name, cfg.promote, "" if "promote" in (raw_config or {}) else
             " (the fleet's policy; -C promote=... overrides it)")
    if controller.get(name):
        return controller.update(name, ref.uri, cfg, wait=wait, block=block)
    return controller.create(name, f"models:/{ref.name}/{ref.version}", cfg, wait=wait, block=block)
