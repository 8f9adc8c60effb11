"""``edgeslim fleet ...``: the same operations as the ``edge`` MLflow deployment target.

Where things come from (never from the command line for secrets):

- the store: ``--store`` or ``$EDGESLIM_FLEET_STORE`` (``s3://bucket/prefix`` or a
  directory; default ``~/.edgeslim/fleet-store``), ``--endpoint-url`` or
  ``$EDGESLIM_S3_ENDPOINT_URL`` for S3-compatible servers;
- S3 credentials: boto3's chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, instance role);
- the signing key: ``--signing-key`` or ``$EDGESLIM_FLEET_SIGNING_KEY`` (a PEM path);
- MLflow: ``$MLFLOW_TRACKING_URI`` or ``--tracking-uri``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from edgeslim.components.common.errors import ConfigError, FleetError, MissingDependencyError

SIGNING_KEY_ENV = "EDGESLIM_FLEET_SIGNING_KEY"


def open_controller(fleet: str, *, store: str | None = None, endpoint_url: str | None = None,
                    signing_key: str | None = None, need_key: bool = False):
    """A :class:`~edgeslim.deploy.controller.Controller` for ``fleet`` from flags and environment."""
    from edgeslim.deploy import signing
    from edgeslim.deploy.controller import Controller
    from edgeslim.deploy.store import open_store

    key_path = signing_key or os.environ.get(SIGNING_KEY_ENV)
    if need_key and not key_path:
        raise ConfigError(f"no signing key: set {SIGNING_KEY_ENV} or pass --signing-key "
                          "(make one with `edgeslim fleet keygen DIR`)")
    key = signing.load_private_key(key_path) if key_path else None
    return Controller(open_store(store, endpoint_url=endpoint_url, create_bucket=True), fleet, signing_key=key)


def split_config(raw: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """Separate ``wait`` from the wave settings."""
    raw = dict(raw or {})
    wait = raw.pop("wait", True)
    if isinstance(wait, str):
        if wait.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"wait: got {wait!r}; expected true or false")
        wait = wait.lower() in ("true", "1", "yes")
    return raw, bool(wait)


def predict(controller, name: str, inputs: Any) -> dict[str, Any]:
    """Run the rollout's model version locally through the edge pyfunc."""
    import mlflow.pyfunc
    import numpy as np

    rec = controller.get(name)
    if rec is None:
        raise FleetError(f"no rollout {name!r} in fleet {controller.fleet!r}")
    m = rec["model"]
    model = mlflow.pyfunc.load_model(f"models:/{m['name']}/{m['version']}")
    if isinstance(inputs, dict) and "inputs" in inputs:
        inputs = inputs["inputs"]
    out = model.predict(np.asarray(inputs, dtype=np.float32))
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in out.items()}


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _parse_c(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"-C {item!r}: expected KEY=VALUE, e.g. -C waves=1,10,50,100")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _cmd(args: argparse.Namespace) -> int:
    import logging

    from edgeslim.deploy.controller import WaveRolloutConfig, fleet_summary

    # botocore logs request headers (Authorization carries the access key id) at DEBUG:
    # keep them out of the log even with --debug.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.fleet_cmd == "keygen":
        from edgeslim.deploy import signing

        priv, pub = signing.generate_keypair(args.dir, overwrite=args.overwrite)
        print(f"private key: {priv} (keep it secret; mode 0600)\npublic key:  {pub} (copy to every device)")
        return 0
    need_key = args.fleet_cmd in ("create", "update", "abort", "delete", "reconcile", "follow", "webhook")
    c = open_controller(args.fleet, store=args.store, endpoint_url=args.endpoint_url,
                        signing_key=args.signing_key, need_key=need_key)
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
    if args.fleet_cmd == "create":
        raw, wait = split_config(_parse_c(args.config))
        rec = c.create(args.name, args.model_uri, WaveRolloutConfig.from_strings(raw), wait=wait and not args.no_wait)
        _print(fleet_summary(c, rec))
        return 0 if rec["state"] in ("succeeded", "pending") else 1
    if args.fleet_cmd == "update":
        raw, wait = split_config(_parse_c(args.config))
        if raw.pop("action", None) == "abort":
            _print(fleet_summary(c, c.abort(args.name)))
            return 0
        rec = c.get(args.name)
        cfg = WaveRolloutConfig.from_strings({**(rec or {}).get("config", {}), **raw}) if rec else None
        rec = c.update(args.name, args.model_uri, cfg, wait=wait and not args.no_wait)
        _print(fleet_summary(c, rec))
        return 0 if rec["state"] in ("succeeded", "pending") else 1
    if args.fleet_cmd == "get":
        rec = c.get(args.name)
        if rec is None:
            raise FleetError(f"no rollout {args.name!r} in fleet {args.fleet!r}; see `edgeslim fleet list`")
        _print(fleet_summary(c, rec))
        return 0
    if args.fleet_cmd == "list":
        _print([{"name": r["name"], "state": r["state"], "model": r["model"]} for r in c.list()])
        return 0
    if args.fleet_cmd == "devices":
        _print(c.devices())
        return 0
    if args.fleet_cmd == "abort":
        _print(fleet_summary(c, c.abort(args.name, args.reason)))
        return 0
    if args.fleet_cmd == "delete":
        _print(fleet_summary(c, c.withdraw(args.name)))
        return 0
    if args.fleet_cmd == "predict":
        data = json.load(open(args.input) if args.input != "-" else sys.stdin)
        _print(predict(c, args.name, data))
        return 0
    if args.fleet_cmd == "reconcile":
        done = c.reconcile()
        _print([{"name": r["name"], "state": r["state"]} for r in done])
        return 0 if all(r["state"] in ("succeeded", "withdrawn") for r in done) else 1
    if args.fleet_cmd == "follow":
        from edgeslim.deploy.controller import follow_alias

        rec = follow_alias(c, args.model, args.alias, args.rollout, _parse_c(args.config))
        _print(fleet_summary(c, rec) if rec else {"started": None, "why": "already rolled out"})
        return 0 if rec is None or rec["state"] in ("succeeded", "pending") else 1
    if args.fleet_cmd == "webhook":
        import importlib.util

        from edgeslim.deploy.controller import follow_alias
        from edgeslim.deploy.webhook import make_server

        if importlib.util.find_spec("mlflow") is None:  # else every alias event fails in the server thread
            raise MissingDependencyError("mlflow", "pipeline", "the webhook rolls out registry versions")
        secret = os.environ.get("EDGESLIM_WEBHOOK_SECRET")
        if not secret:
            raise ConfigError("set EDGESLIM_WEBHOOK_SECRET to the secret given to MLflow's create_webhook")
        raw = _parse_c(args.config)

        def on_alias(model, version, alias):
            try:
                follow_alias(c, model, alias, None, raw)
            except FleetError as exc:
                print(f"edgeslim: rollout of {model} v{version} not started: {exc}", file=sys.stderr)

        server = make_server(args.host, args.port, secret, args.alias, on_alias)
        print(f"listening on http://{args.host}:{server.server_port}/ for alias {args.alias!r}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    raise ConfigError(f"unknown fleet command {args.fleet_cmd!r}")


def register(subparsers) -> None:
    """Add ``edgeslim fleet ...`` to the edgeslim command."""
    p = subparsers.add_parser("fleet", help="signed, staged rollouts to edge fleets",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="fleet_cmd", metavar="FLEET_COMMAND", required=True)

    def common(sp, fleet=True):
        if fleet:
            sp.add_argument("fleet", help="fleet name (the FLEET of edge:/FLEET)")
        sp.add_argument("--store", help="s3://bucket/prefix or a directory (default $EDGESLIM_FLEET_STORE)")
        sp.add_argument("--endpoint-url", help="S3 endpoint (default $EDGESLIM_S3_ENDPOINT_URL)")
        sp.add_argument("--signing-key", help=f"release private key PEM (default ${SIGNING_KEY_ENV})")
        sp.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
        sp.set_defaults(func=_cmd)
        return sp

    k = sub.add_parser("keygen", help="make an ed25519 signing key pair")
    k.add_argument("dir")
    k.add_argument("--overwrite", action="store_true")
    k.set_defaults(func=_cmd)
    for name, helptext in (("create", "start a rollout of models:/NAME@ALIAS"),
                           ("update", "roll out another version under a rollout name, or -C action=abort")):
        sp = common(sub.add_parser(name, help=helptext))
        sp.add_argument("name", help="rollout (deployment) name")
        sp.add_argument("model_uri", nargs="?" if name == "update" else None,
                        help="models:/NAME@ALIAS or models:/NAME/VERSION")
        sp.add_argument("-C", "--config", action="append", metavar="KEY=VALUE",
                        help="waves=1,10,50,100 max_failure_pct=10 min_reported=1 wave_timeout_s=600 ...")
        sp.add_argument("--no-wait", action="store_true", help="record the rollout; `reconcile` runs it")
    for name, helptext in (("get", "show a rollout and its devices"), ("abort", "stop and roll back"),
                           ("delete", "withdraw: devices go back to their previous model")):
        sp = common(sub.add_parser(name, help=helptext))
        sp.add_argument("name")
        if name == "abort":
            sp.add_argument("--reason", default="aborted by request")
    common(sub.add_parser("list", help="list rollouts"))
    common(sub.add_parser("devices", help="registered devices and their status"))
    sp = common(sub.add_parser("predict", help="run the rollout's model locally (edge pyfunc)"))
    sp.add_argument("name")
    sp.add_argument("--input", required=True, help="JSON file with a nested list (or {'inputs': ...}); - for stdin")
    common(sub.add_parser("reconcile", help="run pending or orphaned rollouts (Kubernetes Job/CronJob)"))
    sp = common(sub.add_parser("follow", help="roll out the version an alias points at, if not done yet"))
    sp.add_argument("--model", required=True, help="registered model name")
    sp.add_argument("--alias", default="edge-candidate")
    sp.add_argument("--rollout", default=None, help="rollout name (default MODEL-vVERSION)")
    sp.add_argument("-C", "--config", action="append", metavar="KEY=VALUE")
    sp = common(sub.add_parser("webhook", help="start rollouts from MLflow registry alias webhooks"))
    sp.add_argument("--alias", default="edge-candidate")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8088)
    sp.add_argument("-C", "--config", action="append", metavar="KEY=VALUE")
