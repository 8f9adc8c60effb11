"""`edgeslim fleet`, the webhook signature check, and the shipped deploy files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from edgeslim.cli import build_parser
from edgeslim.deploy.agent.device import build_parser as agent_parser
from edgeslim.deploy.webhook import verify_signature

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
EPOCH = r"\b1\d{9}(\.\d+)?\b"  # seconds since the epoch, as the JSON holds them


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgeslim", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def test_keygen_then_a_local_fleet_lists_and_refuses_unknown_rollouts(tmp_path):
    out = _cli("fleet", "keygen", str(tmp_path / "k"))
    assert out.returncode == 0 and "fleet-signing.pub" in out.stdout
    assert "PRIVATE" not in out.stdout  # the key itself is never printed
    again = _cli("fleet", "keygen", str(tmp_path / "k"))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    store = str(tmp_path / "store")
    assert json.loads(_cli("fleet", "list", "lab", "--store", store, "--json").stdout) == []
    got = _cli("fleet", "get", "lab", "nope", "--store", store)
    assert got.returncode == 2 and got.stderr.count("\n") == 1 and "no rollout 'nope'" in got.stderr


def test_a_rollout_prints_as_a_table_with_iso_times_and_as_json_with_json():
    from edgeslim.deploy.fleet_output import render

    summary = {"name": "r1", "fleet": "lab", "state": "succeeded", "reason": None,
               "model": {"name": "m", "version": "3", "alias": "edge-candidate", "uri": "models:/m@edge-candidate"},
               "waves": [{"index": 0, "devices": 1, "state": "succeeded"}, {"index": 1, "devices": 2, "state": "succeeded"}],
               "devices": {"d0": {"outcome": "committed", "running": "abcdef012345", "heartbeat_age_s": 2.5},
                           "d1": {"outcome": None, "running": None, "heartbeat_age_s": None}},
               "promotion": {"policy": "approval", "since": 1767225600.25, "passed_at": 1767229200.0,
                             "approval": {"by": "ops@host", "at": 1767229199.9}}}
    lines = render("get", summary).splitlines()
    assert "name:      r1" in lines and "model:     m v3 @edge-candidate" in lines and "reason:    -" in lines
    assert lines[lines.index("waves:") + 1].split() == ["INDEX", "DEVICES", "STATE"]
    assert lines[lines.index("devices:") + 1].split() == ["DEVICE", "OUTCOME", "RUNNING", "HEARTBEAT_AGE_S"]
    assert re.fullmatch(r"  d0 +committed +abcdef012345 +2\.5", lines[lines.index("devices:") + 2])
    assert "  since:     2026-01-01T00:00:00Z" in lines and "    at: 2026-01-01T00:59:59Z" in lines
    assert "  passed_at: 2026-01-01T01:00:00Z" in lines
    assert render("list", []) == "(no rollouts)" and render("reconcile", []) == "(no rollouts to run)"
    assert render("list", [{"name": "r1", "state": "pending", "model": summary["model"]}]).splitlines() == [
        "NAME  STATE    MODEL", "r1    pending  m v3 @edge-candidate"]


def test_list_prints_a_table_and_json_with_json(keys, store, tmp_path):
    rec = {"name": "r1", "fleet": "f", "state": "pending", "generation": 1,
           "model": {"name": "m", "version": "3", "alias": None}}
    keys.controller(store).records.save(rec)
    base = ["fleet", "list", "f", "--store", str(tmp_path / "store"), "--root", str(keys.root_path)]
    shown = _cli(*base)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["NAME  STATE    MODEL", "r1    pending  m v3"]
    got = _cli(*base, "--json")
    assert json.loads(got.stdout) == [{"name": "r1", "state": "pending", "model": rec["model"]}]


def test_create_without_a_signing_key_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGESLIM_FLEET_SIGNING_KEY", raising=False)
    out = _cli("fleet", "create", "lab", "r1", "models:/m@edge-candidate", "--store", str(tmp_path))
    assert out.returncode == 2 and "edgeslim fleet keygen" in out.stderr


def test_credentials_on_the_command_line_are_refused(tmp_path):
    from edgeslim.deploy import signing

    priv, _ = signing.generate_keypair(tmp_path / "k")
    out = _cli("fleet", "create", "lab", "r1", "models:/m@edge-candidate", "--store", str(tmp_path / "s"),
               "--signing-key", str(priv), "-C", "aws_secret_access_key=hunter2")
    assert out.returncode == 2 and "never passed as config" in out.stderr
    assert "hunter2" not in out.stderr + out.stdout


def _mlflow_signature(secret, delivery, ts, body):
    digest = hmac.new(secret.encode(), f"{delivery}.{ts}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_webhook_signature_matches_mlflow_and_rejects_forgery_and_replay():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps({"entity": "model_version_alias", "action": "created"})
    ts = str(int(time.time()))
    sig = _generate_hmac_signature("s3cret", "d-1", ts, body)
    assert sig == _mlflow_signature("s3cret", "d-1", ts, body)
    assert verify_signature("s3cret", "d-1", ts, body.encode(), sig)
    assert not verify_signature("other", "d-1", ts, body.encode(), sig)
    assert not verify_signature("s3cret", "d-1", ts, body.encode() + b" ", sig)
    old = str(int(time.time()) - 3600)
    assert not verify_signature("s3cret", "d-1", old, body.encode(), _generate_hmac_signature("s3cret", "d-1", old, body))


def test_kubernetes_manifests_run_real_edgeslim_commands():
    parser = build_parser()
    seen = 0
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc["spec"]
            pod = (spec.get("jobTemplate", {}).get("spec", spec)).get("template", {}).get("spec")
            if not pod:
                continue
            for c in pod["containers"]:
                cmd = c["command"]
                lines = [cmd] if cmd[0] == "edgeslim" else \
                    [shlex.split(part) for part in cmd[-1].split("&&")]
                for argv in lines:
                    argv = [a.replace('"$FLEET"', "f").replace('"$MODEL"', "m") for a in argv]
                    argv = [a.replace("$FLEET", "f").replace("$MODEL", "m") for a in argv]
                    args = parser.parse_args(argv[1:])
                    assert args.func and args.command in ("fleet", "trigger")
                    seen += 1
                names = {e["name"] for e in c.get("env", [])}
                if argv[1] == "trigger":  # compression on registry events: no fleet key either
                    assert "EDGESLIM_FLEET_SIGNING_KEY" not in names
                elif argv[1:3] == ["fleet", "webhook"]:  # the receiver only records requests: no key
                    assert "EDGESLIM_FLEET_SIGNING_KEY" not in names and args.tls_cert
                    # its one volume is its TLS certificate
                    assert [v["secret"]["secretName"] for v in pod["volumes"]] == ["edgeslim-fleet-webhook-tls"]
                else:
                    assert {"EDGESLIM_FLEET_SIGNING_KEY", "EDGESLIM_FLEET_ROOT"} <= names
                assert not any("SECRET" in n and "value" in e for e in c.get("env", []) for n in [e["name"]]
                               if n != "EDGESLIM_WEBHOOK_SECRET")
    assert seen >= 4


def test_systemd_unit_only_sets_options_the_agent_has():
    unit = (DEPLOY / "systemd" / "edgeslim-agent.service").read_text()
    assert re.search(r"^ExecStart=.*edgeslim-agent$", unit, re.M)
    options = {a.dest.upper() for a in agent_parser()._actions}
    for var in set(re.findall(r"EDGESLIM_AGENT_([A-Z_]+)=", unit)):
        assert var in options, var


def test_debug_output_never_shows_s3_credentials(tmp_path):
    """With --debug, a failing S3 call must not log the access key (botocore logs auth headers at DEBUG)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDLEAKCHECK123", AWS_SECRET_ACCESS_KEY="leakchecksecretvalue")
    out = _cli("--debug", "fleet", "list", "lab", "--store", "s3://b/p", "--endpoint-url",
               f"http://127.0.0.1:{port}", env=env)
    assert out.returncode != 0 and "cannot reach" in (out.stderr + out.stdout)
    assert "AKIDLEAKCHECK123" not in out.stderr + out.stdout
    assert "leakchecksecretvalue" not in out.stderr + out.stdout


def test_key_ceremony_root_enrol_timestamp_and_rotation_through_the_cli(tmp_path):
    """The documented commands (docs/security.md): three roles, root version 1, enrolment, a timestamp, a rotation."""
    from edgeslim.deploy import signing, trust
    from edgeslim.deploy.agent.device import Agent, AgentSettings
    from edgeslim.deploy.store import FleetKeys, LocalStore

    k = tmp_path / "k"
    for role in ("root", "release", "fleet"):
        out = _cli("fleet", "keygen", str(k), "--role", role)
        assert out.returncode == 0 and f"{role} private key" in out.stdout, out.stderr
    store_dir = str(tmp_path / "store")
    base = ["--store", store_dir, "--signing-key", str(k / "fleet-signing.key")]
    out = _cli("fleet", "root-init", "lab", *base, "--root-key", str(k / "root.key"),
               "--release-pub", str(k / "release.pub"), "--fleet-pub", str(k / "fleet-signing.pub"),
               "-o", str(tmp_path / "root.json"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["root_version"] == 1, out.stderr
    root, _ = trust.load_root(tmp_path / "root.json")
    store = LocalStore(store_dir)
    agent = Agent(store=store, fleet="lab", device_id="d0", device_class="cls-a", state_dir=tmp_path / "d0",
                  root=root, settings=AgentSettings(poll_interval=0.01))
    agent.recover()
    assert agent.step() == "none"  # registered, no manifest yet

    base += ["--root", str(tmp_path / "root.json")]
    devices = json.loads(_cli("fleet", "devices", "lab", *base, "--json").stdout)
    assert devices["enrolled"] == {} and devices["pending"]["d0"]["fingerprint"] == \
        signing.key_id(agent.device_key.public_key())
    out = _cli("fleet", "enrol", "lab", "d0", *base)
    assert out.returncode == 0, out.stderr
    # People get tables with ISO-8601 UTC times; --json (above) the records, times in epoch seconds.
    assert out.stdout.splitlines()[0].split() == ["DEVICE", "DEVICE_CLASS", "PUBLIC_KEY", "ENROLLED_AT"]
    assert re.fullmatch(rf"d0 +cls-a +\S+ +{ISO}", out.stdout.splitlines()[1]), out.stdout
    shown = _cli("fleet", "devices", "lab", *base).stdout
    assert shown.splitlines()[0] == "enrolled:" and shown.splitlines()[1].split() == [
        "DEVICE", "CLASS", "STATE", "RUNNING", "BACKEND", "HEARTBEAT_AT", "AGENT", "FINGERPRINT"], shown
    fingerprint = signing.key_id(agent.device_key.public_key())
    assert re.search(rf"^  d0 +cls-a +.* {fingerprint}$", shown, re.M) and "pending" in shown, shown
    assert not re.search(EPOCH, shown) and "{" not in shown
    shown = _cli("fleet", "timestamp", "lab", *base).stdout
    assert re.search(rf"^issued_at: +{ISO}\nexpires_at: +{ISO}$", shown, re.M), shown
    assert "d0" in json.loads(_cli("fleet", "devices", "lab", *base, "--json").stdout)["enrolled"]
    ts = json.loads(_cli("fleet", "timestamp", "lab", *base, "--json").stdout)
    assert ts["fleet"] == "lab" and ts["root_version"] == 1 and ts["expires_at"] > time.time()

    # Rotate the fleet key: root version 2, signed by the old and the new root keys.
    k2 = tmp_path / "k2"
    for role in ("root", "fleet"):
        _cli("fleet", "keygen", str(k2), "--role", role)
    out = _cli("fleet", "root-rotate", "lab", *base, "--old-root-key", str(k / "root.key"),
               "--root-key", str(k2 / "root.key"), "--release-pub", str(k / "release.pub"),
               "--fleet-pub", str(k2 / "fleet-signing.pub"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["root_version"] == 2, out.stderr
    agent.step()
    assert agent.root.version == 2 and (agent.state_dir / "roots" / "2.root.json").exists()
    # A "rotation" signed only by a key the devices never trusted is refused, and reported.
    attacker = signing.load_private_key(signing.generate_keypair(tmp_path / "evil", role="root")[0])
    forged = trust.make_root(root_keys=[attacker], release_keys=[attacker], fleet_keys=[attacker], version=3)
    store.put_json(FleetKeys("lab").root(3), trust.sign_with(forged, [attacker]))
    agent.step()
    agent.publish_status("idle")  # the heartbeat run() sends
    st = store.get_json(FleetKeys("lab").status("d0"))[0]["signed"]
    assert agent.root.version == 2 and "refused a new root" in st["metadata"]["error"]
    # The old fleet key no longer speaks for the fleet.
    out = _cli("fleet", "timestamp", "lab", *base)
    assert out.returncode == 2 and "not a fleet key of root version 2" in out.stderr
