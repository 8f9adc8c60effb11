"""Rollout requests: what the keyless webhook records and the controller Job acts on.

The webhook pod (``edgeslim fleet webhook``) holds no signing key and needs no MLflow: on a
signed alias event for a model the fleet follows, it writes one create-once object::

    fleets/<fleet>/requests/<delivery id>.json
    {"type": "edgeslim.fleet.request", "model": ..., "version": ..., "alias": ...,
     "delivery_id": ..., "received_at": ...}

The controller Job (``edgeslim fleet reconcile FLEET --follow MODEL``), which holds the key,
reads them with :func:`pending_requests` and acts with :func:`process_requests`. A request is
only a trigger, never an instruction: the Job re-checks the allow-list (the webhook pod, or
anyone who can write the bucket, may be hostile), re-resolves the alias in MLflow (the version
in a request is a hint; a stale one rolls out what the alias points at now, or nothing), and
deletes every request it read. So a request can make the controller do no more than
``edgeslim fleet follow FLEET --model MODEL`` would do on its next run anyway.

Imports only the standard library and the store at module level: the webhook pod uses
:func:`record_request`; the controller is imported inside :func:`process_requests`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edgeslim.components.common.errors import ConfigError, EdgeslimError
from edgeslim.deploy import bounded
from edgeslim.deploy.store import FleetKeys, ObjectStore, PreconditionFailed, check_name

log = logging.getLogger("edgeslim.requests")

REQUEST_TYPE = "edgeslim.fleet.request"
MAX_MODEL_NAME = 256  # MLflow model names are free text; they are a field here, never a key segment
MAX_VERSION = 64
_FIELDS = ("model", "version", "alias", "delivery_id")


def requests_prefix(fleet: str) -> str:
    return f"{FleetKeys(fleet).base}/requests/"


def request_key(fleet: str, delivery_id: str) -> str:
    """``fleets/{fleet}/requests/{delivery_id}.json``; the delivery id must be a plain name."""
    return f"{requests_prefix(fleet)}{check_name('delivery', delivery_id)}.json"


def _check_text(what: str, value: Any, cap: int) -> str:
    if not isinstance(value, str) or not value or len(value) > cap or not value.isprintable():
        raise ConfigError(f"{what}: expected 1-{cap} printable characters, got {str(value)[:80]!r}")
    return value


def make_request(*, model: str, version: str, alias: str, delivery_id: str,
                 received_at: float | None = None) -> dict[str, Any]:
    """The request object, after checking every field (raises ``ConfigError``)."""
    return {"type": REQUEST_TYPE, "model": _check_text("model", model, MAX_MODEL_NAME),
            "version": _check_text("version", str(version), MAX_VERSION),
            "alias": _check_text("alias", alias, MAX_MODEL_NAME),
            "delivery_id": check_name("delivery", delivery_id),
            "received_at": float(time.time() if received_at is None else received_at)}


def record_request(store: ObjectStore, fleet: str, *, model: str, version: str, alias: str,
                   delivery_id: str, received_at: float | None = None) -> bool:
    """Write the request once (``If-None-Match: *``). False if this delivery id was already recorded."""
    body = make_request(model=model, version=version, alias=alias, delivery_id=delivery_id,
                        received_at=received_at)
    try:
        store.put_json(request_key(fleet, delivery_id), body, if_none_match_any=True)
    except PreconditionFailed:
        return False
    return True


def _parse(key: str, data: bytes, delivery_id: str) -> dict[str, Any]:
    obj = bounded.loads(data, what=key, max_bytes=bounded.MAX_SMALL_BYTES)
    if not isinstance(obj, dict) or obj.get("type") != REQUEST_TYPE:
        raise ConfigError(f"not a {REQUEST_TYPE} object")
    missing = [f for f in _FIELDS if f not in obj]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}")
    if not isinstance(obj.get("received_at"), (int, float)) or isinstance(obj.get("received_at"), bool):
        raise ConfigError("received_at: expected a number")
    if obj["delivery_id"] != delivery_id:
        raise ConfigError(f"delivery_id {str(obj['delivery_id'])[:80]!r} is not the key's {delivery_id!r}")
    return make_request(model=obj["model"], version=obj["version"], alias=obj["alias"],
                        delivery_id=obj["delivery_id"], received_at=obj["received_at"])


def _read(store: ObjectStore, prefix: str, key: str) -> dict[str, Any] | None:
    """The checked request at ``key``; junk is logged and deleted (``None``)."""
    name = key[len(prefix):]
    try:
        if not name.endswith(".json"):
            raise ConfigError("not a request key (<delivery id>.json)")
        delivery_id = check_name("delivery", name[: -len(".json")])
        head = store.head(key)
        if head is None:
            return None  # deleted meanwhile
        if head[0] > bounded.MAX_SMALL_BYTES:
            raise ConfigError(f"{head[0]} bytes, over the cap of {bounded.MAX_SMALL_BYTES}: refused unread")
        blob = store.get(key)
        if blob is None:
            return None
        return _parse(key, blob.data, delivery_id)
    except (ConfigError, bounded.BoundedInputError) as exc:
        log.warning("junk request %s deleted: %s", key[:300], str(exc)[:300])
        store.delete(key)
        return None


def pending_requests(store: ObjectStore, fleet: str) -> list[dict[str, Any]]:
    """Every well-formed request of the fleet, oldest first; junk is logged and deleted."""
    prefix = requests_prefix(fleet)
    out = [r for r in (_read(store, prefix, k) for k in store.list(prefix)) if r is not None]
    return sorted(out, key=lambda r: (r["received_at"], r["delivery_id"]))


def process_requests(controller, *, models: list[str], alias: str,
                     raw_config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Act on the fleet's pending requests; the controller Job's entry.

    For each request: a model not in ``models`` (or a request for another alias) is logged and
    deleted without acting; otherwise :func:`~edgeslim.deploy.controller.follow_alias`
    re-resolves ``models:/MODEL@ALIAS`` in MLflow and starts a rollout if this fleet has not had
    that version yet. Several requests for one model make one look-up. Every request read is
    deleted once handled, also when the rollout could not start (one line in the log; the
    CronJob's ``follow`` is the backstop).

    Returns:
        One dict per request: its fields plus ``outcome`` (``started``, ``already-rolled-out``,
        ``not-started``, ``ignored``) and ``rollout``/``state`` or ``why``.
    """
    from edgeslim.deploy.controller import WaveRolloutConfig, follow_alias

    followed = list(dict.fromkeys(models))
    raw = dict(raw_config or {})
    # A bad -C would fail every request alike: refuse it before any request is used up.
    WaveRolloutConfig.from_strings({k: v for k, v in raw.items() if k != "wait"})
    results: list[dict[str, Any]] = []
    by_model: dict[str, dict[str, Any]] = {}
    for req in pending_requests(controller.store, controller.fleet):
        model, hint = req["model"], req["version"]
        if model not in followed:
            log.warning("request %s: ignored: model %r is not followed by this fleet (--follow %s); deleted",
                        req["delivery_id"], model[:128], ",".join(followed))
            outcome = {"outcome": "ignored", "why": "model not followed"}
        elif req["alias"] != alias:
            log.warning("request %s: ignored: alias %r is not the followed alias %r; deleted",
                        req["delivery_id"], req["alias"][:128], alias)
            outcome = {"outcome": "ignored", "why": f"alias {req['alias']!r} not followed"}
        elif model in by_model:
            outcome = dict(by_model[model], merged=True)  # the alias was re-resolved once this run
        else:
            try:
                rec = follow_alias(controller, model, alias, None, raw)
            except EdgeslimError as exc:
                log.error("request %s: rollout of %s@%s (v%s requested) not started: %s",
                          req["delivery_id"], model, alias, hint, exc)
                outcome = {"outcome": "not-started", "why": str(exc)}
            else:
                if rec is None:
                    log.info("request %s: %s@%s is already rolled out in this fleet", req["delivery_id"], model, alias)
                    outcome = {"outcome": "already-rolled-out"}
                else:
                    got = str((rec.get("model") or {}).get("version"))
                    if got != hint:
                        log.warning("request %s named %s v%s; %s points at v%s now: rolled out v%s",
                                    req["delivery_id"], model, hint, alias, got, got)
                    outcome = {"outcome": "started", "rollout": rec["name"], "state": rec["state"], "version": got}
            by_model[model] = outcome
        controller.store.delete(request_key(controller.fleet, req["delivery_id"]))
        results.append({**req, "requested_version": hint, **outcome})
    return results
