"""Finding 2 (and the design's two roles): an ungated model never reaches a device.

A model version registered without a release statement, or carrying the statement of another
version (its tag copied), cannot be rolled out: ``create`` (in-process and the CLI) fails with
one line naming the fix, ``edgeslim fleet release``. And the fleet key alone is not enough: a
manifest its holder signs by hand for the ungated artifact (no release statement, the statement
of another artifact, or a "release statement" signed with the fleet key itself) is refused by a
real agent process with reason ``release``; the device keeps its gated model.
Real RGW store, real ``mlflow server``, a real agent process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from edgeslim.components.common.errors import SourceError
from edgeslim.deploy import trust
from edgeslim.deploy.controller import WaveRolloutConfig
from edgeslim.deploy.waves import manifest_artifact
from edgeslim.deploy.manifest import Manifest
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow

ORIN = "orin-sm87-jp6.1-trt10.3"


def _create_cli(rgw, s3_url, keys, uri):
    return subprocess.run(
        [sys.executable, "-m", "edgeslim", "fleet", "create", "lab", "r-cli", uri, "--store", s3_url,
         "--endpoint-url", rgw["S3_ENDPOINT_URL"], "--signing-key", str(keys.paths["fleet"][0]),
         "--root", str(keys.root_path), "-C", "waves=100"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_ungated_or_borrowed_release_is_never_rolled_out_nor_installed(
        rgw, s3_url, s3_store, keys, agents, publisher, register_edge_model, tmp_path):
    from mlflow import MlflowClient

    dev = agents("u0", ORIN)
    c = keys.controller(s3_store)
    cfg = WaveRolloutConfig.from_strings({"waves": "100", "poll_interval_s": "0.2", "wave_timeout_s": "60"})
    client = MlflowClient()

    # 1. Registered without a release statement (never gated).
    ungated = make_onnx(tmp_path / "ungated.onnx", seed=31)
    v1, _ = register_edge_model("sec-ungated", ungated, release=False)
    with pytest.raises(SourceError, match="edgeslim fleet release models:/sec-ungated/1") as err:
        c.create("r1", "models:/sec-ungated@edge-candidate", cfg)
    assert "\n" not in str(err.value)
    cli = _create_cli(rgw, s3_url, keys, "models:/sec-ungated@edge-candidate")
    assert cli.returncode == 2, cli
    assert cli.stderr.strip().count("\n") == 0 and "Traceback" not in cli.stderr, cli.stderr
    assert cli.stderr.startswith("edgeslim: error:") and "`edgeslim fleet release" in cli.stderr, cli.stderr

    # 2. The release statement of another (gated) version, its tag copied onto an ungated one.
    gated = make_onnx(tmp_path / "gated.onnx", seed=32)
    v2, sha2 = register_edge_model("sec-ungated", gated, alias="gated")
    v3, _ = register_edge_model("sec-ungated", make_onnx(tmp_path / "v3.onnx", seed=33), release=False)
    client.set_model_version_tag("sec-ungated", v3, trust.RELEASE_TAG,
                                 client.get_model_version("sec-ungated", v2).tags[trust.RELEASE_TAG])
    with pytest.raises(SourceError, match=f"edgeslim fleet release models:/sec-ungated/{v3}") as err:
        c.create("r3", f"models:/sec-ungated/{v3}", cfg)
    assert "another version" in str(err.value) and "\n" not in str(err.value)
    cli = _create_cli(rgw, s3_url, keys, f"models:/sec-ungated/{v3}")
    assert cli.returncode == 2 and cli.stderr.strip().count("\n") == 0, cli
    assert "another version" in cli.stderr and "`edgeslim fleet release" in cli.stderr, cli.stderr

    # Nothing reached the fleet: no record, no manifest, the lock is free.
    assert c.list() == [] and s3_store.get(c.keys.manifest("u0")) is None and s3_store.get(c.keys.lock) is None

    # 3. The controller-key holder signs manifests for the ungated artifact by hand.
    good = publisher.upload(gated)
    publisher.publish("u0", publisher.manifest("u0", ORIN, 1, good, publisher.golden(gated)))
    wait_for(lambda: dev.running_sha() == sha2, 60, "the gated model installed")
    bad = publisher.upload(ungated)
    health = publisher.golden(ungated)

    def by_hand(seq, release):
        now = time.time()
        return Manifest(fleet="lab", device_id="u0", device_class=ORIN, rollout_id=f"by-hand-{seq}", sequence=seq,
                        issued_at=now, expires_at=now + 3600, action="install", artifact=manifest_artifact(bad),
                        model={"name": "m", "version": str(seq)}, health_check=health,
                        release=release).sign(keys.fleet_key)

    def refused(envelope, what):
        etag = publisher.publish("u0", envelope)
        st = wait_for(lambda: (publisher.status("u0").get("rejected") or {}).get("etag") == etag
                      and publisher.status("u0"), 60, f"the agent to refuse {what}")
        assert st["rejected"]["reason"] == "release", (what, st["rejected"])
        assert dev.running_sha() == sha2 and st["current"]["sha256"] == sha2

    refused(by_hand(2, None), "a manifest without a release statement")
    refused(by_hand(3, keys.release(good, name="m", version="3")), "a release statement of another artifact")
    forged = trust.release_payload(name="m", version="4", artifact=bad, engines={},
                                   gate={"passed": True, "summary": "says the fleet key"})
    refused(by_hand(4, trust.sign_with(forged, [keys.fleet_key])), "a release statement the fleet key signed")
    assert dev.saw("refused manifest") and not dev.saw("by-hand")  # never applied, not even started
