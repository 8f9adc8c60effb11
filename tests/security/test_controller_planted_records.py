"""Finding 1: the controller must never sign what a bucket writer put in a rollout record.

A bucket writer plants rollout records (unsigned, signed by their own key, a validly signed
record copied to another name, a record under a name the controller cannot use) and alters a
real one (``expiry_s`` stretched to 10^9 s). ``Controller.reconcile()`` in-process and
``edgeslim fleet reconcile`` as a subprocess (the CronJob) report each one on one line and act
on none: no device gets a new manifest, nothing is signed for the attacker's artifact.
Real RGW store, real ``mlflow server``, real agent processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest

from edgeslim.deploy import signing, trust
from edgeslim.deploy.controller import UntrustedRecord, WaveRolloutConfig
from edgeslim.deploy.manifest import artifact_key
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")


def _manifests(store, devices):
    """Each device's stored manifest: (etag, sequence)."""
    out = {}
    for d in devices:
        blob = store.get(K.manifest(d))
        out[d] = (blob.etag, json.loads(blob.data)["signed"]["sequence"]) if blob else None
    return out


def test_planted_copied_and_altered_records_are_reported_never_acted_on(
        rgw, s3_url, s3_store, keys, agents, register_edge_model, tmp_path, caplog):
    devs = {n: agents(n, ORIN) for n in ("p0", "p1")}
    v1, sha1 = register_edge_model("sec-planted", make_onnx(tmp_path / "v1.onnx", seed=21))
    c = keys.controller(s3_store)
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "60"})
    assert c.create("r1", "models:/sec-planted@edge-candidate", cfg)["state"] == "succeeded"
    wait_for(lambda: all(d.running_sha() == sha1 for d in devs.values()), 60, "both devices on v1")

    # v2 is gated, but the operator stopped its rollout before it started: a validly signed,
    # pending record of it exists in the store's history.
    v2, sha2 = register_edge_model("sec-planted", make_onnx(tmp_path / "v2.onnx", seed=22))
    assert c.create("r2", f"models:/sec-planted/{v2}", cfg, wait=False)["state"] == "pending"
    pending = s3_store.get_json(K.rollout("r2"))[0]
    assert c.abort("r2")["state"] == "aborted"

    # The attacker's own model: in the store, never registered, never gated.
    evil = (tmp_path / "evil.onnx")
    make_onnx(evil, seed=666)
    evil_sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    s3_store.put(artifact_key(evil_sha), evil.read_bytes())
    evil_art = {"key": artifact_key(evil_sha), "sha256": evil_sha, "size": evil.stat().st_size,
                "format": "onnx", "metadata": {}}
    attacker = signing.load_private_key(signing.generate_keypair(tmp_path / "attacker")[0])

    def record(name, **over):
        rec = copy.deepcopy(pending["signed"])
        rec.update(name=name, artifact=evil_art, engines={}, release=None,
                   model={"name": "attacker", "version": "1", "alias": None, "run_id": None, "uri": "models:/x/1"},
                   **over)
        rec["config"]["expiry_s"] = 1e9
        return rec

    planted = {
        # a bare record, no envelope at all
        "evil-bare": record("evil-bare"),
        # an envelope with no signatures
        "evil-unsigned": {"signed": record("evil-unsigned"), "signatures": []},
        # signed by the attacker's key; "aborting" with a rollback target of the attacker's choosing
        "evil-attacker": trust.sign_with(record("evil-attacker", state="aborting", devices={
            d: {"wave": 0, "device_class": ORIN, "sent": {"sequence": 1, "etag": "x"}, "before": evil_sha,
                "public_key": "x", "outcome": "failed", "reason": None} for d in devs}), [attacker]),
        # the operator's own signed record of v2, copied under another name to resurrect it
        "evil-copy": pending,
    }
    for name, body in planted.items():
        s3_store.put_json(K.rollout(name), body)
    # Keys the controller cannot name a rollout by: not a plain name, and a sub-folder whose last
    # part is a real rollout's name (it must not be read as that rollout).
    odd = [f"{K.rollouts_prefix}not a name.json", f"{K.rollouts_prefix}sub/r1.json"]
    s3_store.put_json(odd[0], planted["evil-unsigned"])
    s3_store.put_json(odd[1], pending)
    # A real record, altered: the same signature over a stretched expiry.
    altered = copy.deepcopy(pending)
    altered["signed"]["config"]["expiry_s"] = 1e9
    s3_store.put_json(K.rollout("r2"), altered)
    before = _manifests(s3_store, devs)
    assert all(before.values())

    caplog.set_level("WARNING", logger="edgeslim.controller")
    assert c.reconcile() == []
    for name in [*planted, "r2"]:
        with pytest.raises(UntrustedRecord, match="delete"):
            c.get(name)
        assert f"rollouts/{name}.json" in caplog.text, f"{name} was not reported"
    for key in odd:
        assert f"{key}: rollout name" in caplog.text, f"{key} was not reported"
    with pytest.raises(UntrustedRecord, match="forged or altered"):
        c.get("r2")  # editing expiry_s broke the fleet key's signature

    # The CronJob's command, as a subprocess.
    cli = subprocess.run(
        [sys.executable, "-m", "edgeslim", "fleet", "reconcile", "lab", "--store", s3_url,
         "--endpoint-url", rgw["S3_ENDPOINT_URL"], "--signing-key", str(keys.paths["fleet"][0]),
         "--root", str(keys.root_path), "--json"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert "Traceback" not in cli.stderr, cli.stderr
    assert cli.returncode == 1, (cli.returncode, cli.stderr)  # the CronJob fails visibly
    assert "rollout record(s) not acted on" in cli.stderr
    assert json.loads(cli.stdout) == []  # nothing resumed
    for name in [*planted, "r2"]:
        lines = [ln for ln in cli.stderr.splitlines() if f"rollouts/{name}.json" in ln]
        assert len(lines) == 1, (name, cli.stderr)
        assert "planted or altered" in lines[0] or "copied from elsewhere" in lines[0], lines[0]
    for key in odd:
        assert len([ln for ln in cli.stderr.splitlines() if f"{key}: rollout name" in ln]) == 1, cli.stderr

    # Nothing was acted on: no device got a new manifest, nothing was signed for the attacker's
    # artifact, the lock is free, and every device still runs the gated v1.
    assert _manifests(s3_store, devs) == before
    assert s3_store.get(K.target(evil_sha)) is None
    assert s3_store.get(K.lock) is None
    assert all(d.running_sha() == sha1 for d in devs.values())
    assert [r["name"] for r in c.list()] == ["r1"]
