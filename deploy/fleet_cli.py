"""``edgeslim fleet ...``: the same operations as the ``edge`` MLflow deployment target.

Where things come from (never from the command line for secrets):

- the store: ``--store`` or ``$EDGESLIM_FLEET_STORE`` (``s3://bucket/prefix`` or a
  directory; default ``~/.edgeslim/fleet-store``), ``--endpoint-url`` or
  ``$EDGESLIM_S3_ENDPOINT_URL`` for S3-compatible servers;
- S3 credentials: boto3's chain when boto3 is installed (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
  ``AWS_PROFILE``, instance role, web identity, SSO); without it, edgeslim's own S3 client reads the
  environment and the shared credentials file (``$EDGESLIM_S3_CLIENT=light|boto3`` forces one);
- the fleet (director) key: ``--signing-key`` or ``$EDGESLIM_FLEET_SIGNING_KEY`` (a PEM path);
- the fleet's root document: ``--root`` or ``$EDGESLIM_FLEET_ROOT`` (``root.json`` from
  ``edgeslim fleet root-init``; newer versions in the store are followed);
- the release key (``edgeslim fleet release``): ``--release-key`` or ``$EDGESLIM_RELEASE_KEY``;
- the approver key (``edgeslim fleet approve``): ``--approver-key`` or ``$EDGESLIM_APPROVER_KEY``;
- MLflow: ``$MLFLOW_TRACKING_URI`` or ``--tracking-uri``.

Results print as tables and ``key: value`` lines with times in ISO-8601 UTC; ``--json`` prints
the records themselves (times in seconds since the epoch), for scripts.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import sys
from typing import Any

from edgeslim.components.common.errors import ConfigError, FleetError

SIGNING_KEY_ENV = "EDGESLIM_FLEET_SIGNING_KEY"
ROOT_ENV = "EDGESLIM_FLEET_ROOT"
# How long `approve` keeps trying for the fleet lock another controller holds (one ending its check).
APPROVE_LOCK_WAIT_S = 30.0
# States a command may leave a rollout in without failing: it goes on, or waits for its promotion.
OK_STATES = ("succeeded", "pending", "soaking", "awaiting-approval")


def _bool(what: str, value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{what}: got {value!r}; expected true or false")
    return value.lower() in ("true", "1", "yes")


def open_controller(fleet: str, *, store: str | None = None, endpoint_url: str | None = None,
                    signing_key: str | None = None, need_key: bool = False, root: str | None = None):
    """A :class:`~edgeslim.deploy.controller.Controller` for ``fleet`` from flags and environment."""
    from edgeslim.deploy import signing, trust
    from edgeslim.deploy.controller import Controller
    from edgeslim.deploy.store import open_store

    key_path = signing_key or os.environ.get(SIGNING_KEY_ENV)
    if need_key and not key_path:
        raise ConfigError(f"no fleet signing key: set {SIGNING_KEY_ENV} or pass --signing-key "
                          "(make one with `edgeslim fleet keygen DIR --role fleet`)")
    key = signing.load_private_key(key_path) if key_path else None
    root_path = root or os.environ.get(ROOT_ENV)
    trusted = trust.load_root(root_path)[0] if root_path else None
    return Controller(open_store(store, endpoint_url=endpoint_url, create_bucket=True), fleet, signing_key=key,
                      root=trusted)


def _root_cmd(args: argparse.Namespace) -> int:
    """``root-init`` and ``root-rotate``: the offline root keys sign the fleet's root document."""
    from edgeslim.deploy import signing, trust
    from edgeslim.deploy.store import FleetKeys, PreconditionFailed, open_store

    def pubs(paths):
        return [k for p in paths or [] for k in signing.load_public_keys(p).values()]

    thresholds = {k: int(v) for k, v in _parse_c(args.threshold).items()}
    root_keys = [signing.load_private_key(p) for p in args.root_key]
    store = open_store(args.store, endpoint_url=args.endpoint_url, create_bucket=True)
    keys = FleetKeys(args.fleet)
    if args.fleet_cmd == "root-init":
        version, signers = 1, root_keys
    else:
        current, _ = trust.load_root(args.root or os.environ.get(ROOT_ENV) or "")
        current, _ = trust.update_root(current, lambda v: (store.get_json(keys.root(v)) or (None,))[0])
        old = [signing.load_private_key(p) for p in args.old_root_key or []]
        version, signers = current.version + 1, old + root_keys
    payload = trust.make_root(root_keys=root_keys, release_keys=pubs(args.release_pub), fleet_keys=pubs(args.fleet_pub),
                              thresholds=thresholds, version=version, fleet=args.fleet,
                              approver_keys=pubs(args.approver_pub))
    envelope = trust.sign_with(payload, signers)
    if version > 1:
        current.successor(envelope)  # the devices' check, before anything is published
    try:
        store.put_json(keys.root(version), envelope, if_none_match_any=True)
    except PreconditionFailed:
        raise FleetError(f"root version {version} already exists in the store; roots are never rewritten") from None
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(envelope, fh, indent=1, sort_keys=True)
    _print({"fleet": args.fleet, "root_version": version, "published": keys.root(version), "written": args.output,
            "roles": payload["roles"]})
    return 0


def split_config(raw: dict[str, Any] | None, *, default_wait: bool = True) -> tuple[dict[str, Any], bool]:
    """Separate ``wait`` from the wave settings."""
    raw = dict(raw or {})
    wait = raw.pop("wait", default_wait)
    if isinstance(wait, str):
        wait = _bool("wait", wait)
    return raw, bool(wait)


def approved_line(rec: dict[str, Any], next_step: str) -> str:
    """One line for the approver: which rollout was approved, and what promotes it now."""
    return f"edgeslim: rollout {rec['name']!r} (generation {rec.get('generation', 1)}) {next_step}"


def load_approver_key(path: str | None = None):
    """The approver's private key: ``path``, else ``$EDGESLIM_APPROVER_KEY``; None when neither is set."""
    from edgeslim.deploy import signing
    from edgeslim.deploy.promotion import APPROVER_KEY_ENV

    path = path or os.environ.get(APPROVER_KEY_ENV)
    return signing.load_private_key(path) if path else None


def approve(c, name: str, *, by: str | None = None, wait: bool = True, approver_key=None) -> int:
    """``approve`` and ``update -C action=approve``: write the approval, signed by the approver key; with
    the fleet key (and ``wait``) promote the rollout here and run its remaining waves, as ``create``
    runs its waves; otherwise say what promotes it."""
    from edgeslim.deploy.controller import approved_next, fleet_summary

    rec = c.approve(name, by=by, approver_key=approver_key)
    if not wait or c.fleet_trust.signing_key is None:
        _print(fleet_summary(c, rec))
        why = "" if wait else " (--no-wait)"
        if c.fleet_trust.signing_key is None:
            why = f" (no fleet key here: set {SIGNING_KEY_ENV} to promote it with this command)"
        print(approved_line(rec, approved_next(c, rec) + why), file=sys.stderr)
        return 0
    print(approved_line(rec, "approved; promoting it here and running its remaining waves"), file=sys.stderr)
    done = c.resume(name, lock_wait_s=APPROVE_LOCK_WAIT_S)
    if done is None:  # another controller holds it, or it ended meanwhile
        done = c.get(name) or rec
        if done["state"] == "awaiting-approval":
            print(approved_line(done, approved_next(c, done)), file=sys.stderr)
    _print(fleet_summary(c, done))
    return 0 if done["state"] in OK_STATES else 1


def predict(controller, name: str, inputs: Any) -> dict[str, Any]:
    """Run the rollout's model version locally through the edge pyfunc. ``inputs``: the parsed JSON of
    ``edgeslim fleet predict``, or the DataFrame ``mlflow deployments predict`` reads
    (:func:`~edgeslim.deploy.predict_input.model_input` says which forms)."""
    import mlflow.pyfunc

    from edgeslim.deploy.predict_input import model_input, tensor_inputs

    rec = controller.get(name)
    if rec is None:
        raise FleetError(f"no rollout {name!r} in fleet {controller.fleet!r}")
    m = rec["model"]
    model = mlflow.pyfunc.load_model(f"models:/{m['name']}/{m['version']}")
    out = model.predict(model_input(inputs, tensor_inputs(model.metadata)))
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in out.items()}


# The command being run: its --json, and its name for the table view.
_COMMAND: contextvars.ContextVar[argparse.Namespace | None] = contextvars.ContextVar("fleet_command", default=None)


def _print(obj: Any) -> None:
    """A result: tables with ISO-8601 UTC times for people, the record as JSON with --json (and when
    a function here such as :func:`approve` is called from Python, outside a command)."""
    args = _COMMAND.get()
    if args is None or args.json:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        from edgeslim.deploy.fleet_output import render

        print(render(args.fleet_cmd, obj))


def _run(args: argparse.Namespace) -> int:
    token = _COMMAND.set(args)
    try:
        return _cmd(args)
    finally:
        _COMMAND.reset(token)


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
    # keep them out of the log even with --debug (the light S3 client logs no headers).
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.fleet_cmd == "keygen":
        from edgeslim.deploy import signing

        priv, pub = signing.generate_keypair(args.dir, overwrite=args.overwrite, role=args.role)
        print(f"{args.role} private key: {priv} (keep it secret; mode 0600)\n{args.role} public key:  {pub} "
              "(goes into the root document: `edgeslim fleet root-init`)")
        return 0
    if args.fleet_cmd in ("root-init", "root-rotate"):
        return _root_cmd(args)
    if args.fleet_cmd == "release":
        from edgeslim.deploy.release import sign_uri

        if args.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(args.tracking_uri)
        env = sign_uri(args.model_uri, args.release_key, expires_s=args.expires_days * 86400.0)
        _print({"signed": env["signed"]["model"], "artifact": env["signed"]["artifact"],
                "engines": sorted(env["signed"]["engines"]), "expires_at": env["signed"]["expires_at"]})
        return 0
    if args.fleet_cmd == "webhook":
        # Keyless and MLflow-free: it only records requests; `reconcile --follow` acts on them.
        from edgeslim.deploy.requests import record_request
        from edgeslim.deploy.store import check_name, open_store
        from edgeslim.deploy.webhook import make_server
        from edgeslim.deploy.webhook_tls import TlsFiles, check_url, needs_line, receiver_url

        secret = os.environ.get("EDGESLIM_WEBHOOK_SECRET")
        if not secret:
            raise ConfigError("set EDGESLIM_WEBHOOK_SECRET to the secret given to MLflow's create_webhook")
        tls = TlsFiles(args.tls_cert, args.tls_key) if (args.tls_cert or args.tls_key) else None
        if args.url:
            check_url(args.url)
        if args.signing_key:
            raise ConfigError("the webhook records requests and signs nothing: drop --signing-key (the "
                              "controller Job, `edgeslim fleet reconcile FLEET --follow MODEL`, holds the key)")
        raw = _parse_c(args.config)
        models = list(dict.fromkeys([*(args.model or []),
                                     *(m.strip() for m in raw.pop("models", "").split(",") if m.strip())]))
        if raw:
            raise ConfigError(f"-C {', '.join(sorted(raw))}: the webhook only records requests; give rollout "
                              "settings to `edgeslim fleet reconcile FLEET --follow MODEL -C ...`")
        if not models:
            raise ConfigError("name the models this fleet follows: --model NAME (repeat it) or -C models=a,b; "
                              "alias events of every other model are ignored")
        fleet = check_name("fleet", args.fleet)
        store = open_store(args.store, endpoint_url=args.endpoint_url, create_bucket=True)

        def on_request(model, version, alias, delivery_id):
            return record_request(store, fleet, model=model, version=version, alias=alias, delivery_id=delivery_id)

        logging.getLogger("edgeslim.webhook").setLevel(logging.INFO)  # a service: log what it decides
        server = make_server(args.host, args.port, secret, args.alias, models=models, on_request=on_request,
                             read_timeout=args.read_timeout, workers=args.workers, tls=tls)
        print(f"listening on {server.scheme}://{args.host}:{server.server_port}/ for alias {args.alias!r} of "
              f"{', '.join(models)}; requests go to {store.describe()}", flush=True)
        needs = needs_line(receiver_url(args.host, server.server_port, tls=tls is not None, url=args.url))
        if needs:
            print(needs, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    need_key = args.fleet_cmd in ("create", "update", "abort", "delete", "reconcile", "follow", "enrol",
                                  "timestamp") or (args.fleet_cmd == "policy" and args.auto_promote is not None)
    c = open_controller(args.fleet, store=args.store, endpoint_url=args.endpoint_url,
                        signing_key=args.signing_key, need_key=need_key, root=args.root)
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
    if args.fleet_cmd == "create":
        raw, wait = split_config(_parse_c(args.config))
        rec = c.create(args.name, args.model_uri, WaveRolloutConfig.from_strings(raw), wait=wait and not args.no_wait)
        _print(fleet_summary(c, rec))
        return 0 if rec["state"] in OK_STATES else 1
    if args.fleet_cmd == "update":
        raw, wait = split_config(_parse_c(args.config))
        action = raw.pop("action", None)
        if action == "abort":
            _print(fleet_summary(c, c.abort(args.name)))
            return 0
        if action == "approve":
            return approve(c, args.name, wait=not args.no_wait, approver_key=load_approver_key())
        if action is not None:
            raise ConfigError(f"-C action={action}: expected abort or approve")
        rec = c.get(args.name)
        cfg = WaveRolloutConfig.from_strings({**(rec or {}).get("config", {}), **raw}) if rec else None
        rec = c.update(args.name, args.model_uri, cfg, wait=wait and not args.no_wait)
        _print(fleet_summary(c, rec))
        return 0 if rec["state"] in OK_STATES else 1
    if args.fleet_cmd == "approve":
        return approve(c, args.name, by=args.by, wait=not args.no_wait,
                       approver_key=load_approver_key(args.approver_key))
    if args.fleet_cmd == "policy":
        if args.auto_promote is not None:
            pol = c.set_policy(auto_promote=_bool("--auto-promote", args.auto_promote))
        else:
            pol = c.policy()
        _print({"fleet": args.fleet, "auto_promote": pol["auto_promote"], "updated_at": pol.get("updated_at"),
                **({"ignored": pol["ignored"]} if pol.get("ignored") else {}),
                "webhook_rollouts": "promote=auto" if pol["auto_promote"] else
                "promote=approval (unless `follow`/`reconcile --follow` is given -C promote=...)"})
        return 0
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
        _print({"enrolled": c.devices(), "pending": c.pending()})
        return 0
    if args.fleet_cmd == "enrol":
        _print({args.device: c.enrol(args.device, args.device_class, args.public_key)})
        return 0
    if args.fleet_cmd == "timestamp":
        _print(c.publish_timestamp())
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
        handled = []
        if args.follow:  # the webhook's requests first: re-checked, re-resolved in MLflow, then deleted
            from edgeslim.deploy.requests import process_requests

            handled = process_requests(c, models=args.follow, alias=args.alias, raw_config=_parse_c(args.config))
            for h in handled:
                print(f"edgeslim: request {h['delivery_id']} ({h['model'][:128]} v{h['requested_version'][:64]}): "
                      f"{h['outcome']}{' ' + h['rollout'] if h.get('rollout') else ''}"
                      f"{' (' + h['why'][:300] + ')' if h.get('why') else ''}", file=sys.stderr)
        states = {h["rollout"]: h["state"] for h in handled if h.get("rollout")}
        states.update({r["name"]: r["state"] for r in c.reconcile()})
        _print([{"name": n, "state": st} for n, st in states.items()])
        ok = all(st in ("succeeded", "withdrawn", "soaking", "awaiting-approval") for st in states.values())
        if c.untrusted:  # the CronJob fails visibly: someone wrote rollout records the fleet key did not sign
            print(f"edgeslim: {len(c.untrusted)} rollout record(s) not acted on (planted, altered or replayed; "
                  "each named above): delete them", file=sys.stderr)
        if c.unchecked:
            print(f"edgeslim: {len(c.unchecked)} rollout(s) not resumed: MLflow did not answer the check of "
                  "their end (each named above); run reconcile again once it answers", file=sys.stderr)
        return 0 if ok and not c.untrusted and not c.unchecked and \
            not any(h["outcome"] == "not-started" for h in handled) else 1
    if args.fleet_cmd == "follow":
        from edgeslim.deploy.controller import follow_alias

        rec = follow_alias(c, args.model, args.alias, args.rollout, _parse_c(args.config))
        _print(fleet_summary(c, rec) if rec else {"started": None, "why": "already rolled out"})
        return 0 if rec is None or rec["state"] in OK_STATES else 1
    raise ConfigError(f"unknown fleet command {args.fleet_cmd!r}")


def register(subparsers) -> None:
    """Add ``edgeslim fleet ...`` to the edgeslim command."""
    from edgeslim.components.common.helptext import plain

    p = subparsers.add_parser("fleet", help="signed, staged rollouts to edge fleets",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="fleet_cmd", metavar="FLEET_COMMAND", required=True,
                           help="what to do (`edgeslim fleet FLEET_COMMAND --help` shows its options)")

    def common(sp, fleet=True, result=True):
        if fleet:
            sp.add_argument("fleet", help="fleet name (the FLEET of edge:/FLEET)")
        sp.add_argument("--store", help="s3://bucket/prefix or a directory (default $EDGESLIM_FLEET_STORE)")
        sp.add_argument("--endpoint-url", help="S3 endpoint (default $EDGESLIM_S3_ENDPOINT_URL)")
        sp.add_argument("--signing-key", help=f"fleet (director) private key PEM (default ${SIGNING_KEY_ENV})")
        sp.add_argument("--root", help=f"the fleet's root document, root.json (default ${ROOT_ENV})")
        sp.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
        if result:
            json_flag(sp)
        else:
            sp.set_defaults(func=_cmd)
        return sp

    def json_flag(sp):
        sp.add_argument("--json", action="store_true",
                        help="print the result as JSON (times in seconds since the epoch) instead of tables")
        sp.set_defaults(func=_run)

    k = sub.add_parser("keygen", help="make an ed25519 key pair for one role (root, release or fleet)")
    k.add_argument("dir", help="folder for the key pair (made if missing)")
    k.add_argument("--role", choices=("root", "release", "fleet", "approver"), default="fleet",
                   help="root: offline, signs the root document; release: signs gated models; "
                        "fleet: the controller's online key; approver: signs approvals (`edgeslim fleet approve`)")
    k.add_argument("--overwrite", action="store_true", help="replace a key pair of this role already in DIR")
    k.set_defaults(func=_cmd)
    for name, helptext in (("root-init", "sign root version 1 (give root.json to devices and controllers)"),
                           ("root-rotate", "sign the next root version with the old and the new root keys")):
        sp = common(sub.add_parser(name, help=helptext))
        sp.add_argument("--root-key", action="append", required=True, help="root private key PEM (repeat)")
        if name == "root-rotate":
            sp.add_argument("--old-root-key", action="append", required=True,
                            help="a private key of the current root role (repeat up to its threshold)")
        sp.add_argument("--release-pub", action="append", required=True, help="release public key PEM (repeat)")
        sp.add_argument("--fleet-pub", action="append", required=True, help="fleet public key PEM (repeat)")
        sp.add_argument("--approver-pub", action="append",
                        help="approver public key PEM (repeat); without one, no approval is accepted")
        sp.add_argument("--threshold", action="append", metavar="ROLE=N", help="signatures a role needs (default 1)")
        sp.add_argument("-o", "--output", help="also write the signed root document here")
    sp = sub.add_parser("release", help="sign the release statement of a gated model version")
    sp.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    sp.add_argument("--release-key", help="release private key PEM (default $EDGESLIM_RELEASE_KEY)")
    sp.add_argument("--expires-days", type=float, default=365.0, help="devices refuse it after this")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    json_flag(sp)
    sp = common(sub.add_parser("enrol", help="add a registered device to the fleet's signed inventory"))
    sp.add_argument("device", help="the device id it registered with (see `edgeslim fleet devices`)")
    sp.add_argument("--class", dest="device_class", help="device class (default: its registration's)")
    sp.add_argument("--public-key", help="its public key, base64 (default: its registration's; check the "
                                         "fingerprint `fleet devices` shows against the device's log)")
    common(sub.add_parser("timestamp",
                          help="sign a fresh fleet timestamp and sequence statement (run it as a CronJob)"))
    for name, helptext in (("create", "start a rollout of models:/NAME@ALIAS"),
                           ("update", "roll out another version under a rollout name, or -C action=abort")):
        sp = common(sub.add_parser(name, help=helptext))
        sp.add_argument("name", help="rollout (deployment) name")
        sp.add_argument("model_uri", nargs="?" if name == "update" else None,
                        help="models:/NAME@ALIAS or models:/NAME/VERSION")
        sp.add_argument("-C", "--config", action="append", metavar="KEY=VALUE",
                        help="waves=1,10,50,100 max_failure_pct=10 min_reported=1 wave_timeout_s=600 "
                             "promote=auto|soak|approval soak_s=3600 ..." +
                             (" action=abort|approve" if name == "update" else ""))
        sp.add_argument("--no-wait", action="store_true", help="record the rollout; `reconcile` runs it")
    for name, helptext in (("get", "show a rollout and its devices"), ("abort", "stop and roll back"),
                           ("delete", "withdraw: devices go back to their previous model")):
        sp = common(sub.add_parser(name, help=helptext))
        sp.add_argument("name", help="rollout (deployment) name")
        if name == "abort":
            sp.add_argument("--reason", default="aborted by request",
                            help="recorded in the rollout and its MLflow tag (default: aborted by request)")
    sp = common(sub.add_parser("approve", help="approve the promotion of a rollout awaiting approval "
                                               "(-C promote=approval) past its canary wave; with the fleet key, "
                                               "promote it here and run its remaining waves"))
    sp.add_argument("name", help="rollout (deployment) name")
    sp.add_argument("--by", default=None, help="who approves (default USER@HOST; recorded; the approver key "
                                               "is what authenticates)")
    sp.add_argument("--approver-key", help="approver private key PEM (default $EDGESLIM_APPROVER_KEY)")
    sp.add_argument("--no-wait", action="store_true", help="only record the approval; the controller holding "
                                                           "the fleet lock, or the next `reconcile`, promotes it")
    sp = common(sub.add_parser("policy", help="show or set the fleet's promotion policy (signed by the fleet key)"))
    sp.add_argument("--auto-promote", metavar="true|false", default=None,
                    help="true: rollouts started by `follow`/`reconcile --follow` (the webhook's) promote past the "
                         "canary on their own; false (the default): they wait for `edgeslim fleet approve`")
    common(sub.add_parser("list", help="list rollouts"))
    common(sub.add_parser("devices", help="registered devices and their status"))
    sp = common(sub.add_parser("predict", help="run the rollout's model locally (edge pyfunc)"))
    sp.add_argument("name", help="rollout (deployment) name")
    sp.add_argument("--input", "--input-path", dest="input", required=True, help="JSON file: {\"inputs\": [sample, ...]} or a list of samples, each "
                                                   "nested as the model's input, or rows of flat numbers; - for stdin")
    sp = common(sub.add_parser("reconcile", help="act on webhook requests (--follow), then run pending or "
                                                 "orphaned rollouts (Kubernetes Job/CronJob)"))
    sp.add_argument("--follow", action="append", metavar="MODEL",
                    help="act on recorded webhook requests for this registered model (repeat); requests for "
                         "any other model are deleted unused")
    sp.add_argument("--alias", default="edge-candidate", help="the alias the requests follow")
    sp.add_argument("-C", "--config", action="append", metavar="KEY=VALUE", help="settings of started rollouts")
    sp = common(sub.add_parser("follow", help="roll out the version an alias points at, if not done yet"))
    sp.add_argument("--model", required=True, help="registered model name")
    sp.add_argument("--alias", default="edge-candidate", help="the alias to follow (default edge-candidate)")
    sp.add_argument("--rollout", default=None, help="rollout name (default MODEL-vVERSION)")
    sp.add_argument("-C", "--config", action="append", metavar="KEY=VALUE",
                    help="settings of the rollout it starts, as for create (repeat)")
    sp = common(sub.add_parser("webhook", help="record rollout requests from MLflow registry alias webhooks "
                                               "(keyless; `reconcile --follow` acts on them)"), result=False)
    sp.add_argument("--model", action="append", metavar="NAME",
                    help="a registered model this fleet follows (repeat; or -C models=a,b); required")
    sp.add_argument("--alias", default="edge-candidate",
                    help="the alias whose moves are recorded (default edge-candidate)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)")
    sp.add_argument("--port", type=int, default=8088, help="port to listen on (default 8088; 0: a free port)")
    sp.add_argument("--read-timeout", type=float, default=10.0,
                    help="seconds a client has to send its whole request (default 10)")
    sp.add_argument("--workers", type=int, default=16, help="threads that check and record requests (default 16)")
    sp.add_argument("-C", "--config", action="append", metavar="KEY=VALUE", help="models=a,b")
    sp.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (and its chain); with "
                                                       "--tls-key. Reloaded when it changes")
    sp.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    sp.add_argument("--url", help="the URL given to MLflow's create_webhook (default: the listening address); "
                                  "at start, one line says what MLflow's server needs to deliver there")
