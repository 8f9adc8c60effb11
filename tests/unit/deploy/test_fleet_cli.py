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

import pytest
import yaml

from edgeslim.cli import build_parser
from edgeslim.deploy.agent.device import build_parser as agent_parser
from edgeslim.deploy.webhook import verify_signature

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgeslim", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_keygen_then_a_local_fleet_lists_and_refuses_unknown_rollouts(tmp_path):
    out = _cli("fleet", "keygen", str(tmp_path / "k"))
    assert out.returncode == 0 and "fleet-signing.pub" in out.stdout
    assert "PRIVATE" not in out.stdout  # the key itself is never printed
    again = _cli("fleet", "keygen", str(tmp_path / "k"))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    store = str(tmp_path / "store")
    assert json.loads(_cli("fleet", "list", "lab", "--store", store).stdout) == []
    got = _cli("fleet", "get", "lab", "nope", "--store", store)
    assert got.returncode == 2 and got.stderr.count("\n") == 1 and "no rollout 'nope'" in got.stderr


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
                    assert args.func and args.command == "fleet"
                    seen += 1
                names = {e["name"] for e in c.get("env", [])}
                if argv[1:3] == ["fleet", "webhook"]:  # the receiver only records requests: no key
                    assert "EDGESLIM_FLEET_SIGNING_KEY" not in names and not pod.get("volumes")
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
