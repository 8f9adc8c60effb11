"""A device behind a broken link is never stranded on a manifest it could not read whole.

A real agent (edgeslim's own S3 client, as a device without boto3 has) reads the store through
tests/hostile_s3.py in front of RGW:

1. its manifest's body breaks off before its Content-Length: the read is an outage (one line,
   retried with backoff), never a manifest to refuse, and the next poll installs it;
2. a broken intermediary cuts the body and its Content-Length alike: the agent refuses what it got
   as not JSON, but does not remember its ETag, so the next poll reads the manifest again (it would
   otherwise get "not modified" until the controller wrote a new one) and installs it;
3. a server that trickles the manifest a byte at a time is cut off at the call's deadline.

The agent logs each in one line, never a traceback, and keeps serving throughout.
"""

from __future__ import annotations

import pytest

from edgeslim.deploy.store import CLIENT_ENV
from tests.fleet_it_helpers import make_onnx, wait_for
from tests.hostile_s3 import HostileS3

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"
MANIFEST = r"/devices/h0/manifest\.json$"


def test_a_manifest_read_short_is_read_again(agents, publisher, rgw, tmp_path, monkeypatch):
    s3 = HostileS3(upstream=rgw["S3_ENDPOINT_URL"])
    monkeypatch.setenv(CLIENT_ENV, "light")
    try:
        dev = agents("h0", ORIN, endpoint=s3.endpoint)
        arts = [publisher.upload(make_onnx(tmp_path / f"v{i}.onnx", seed=60 + i)) for i in (1, 2, 3)]

        def publish(seq: int):
            art = arts[seq - 1]
            publisher.publish("h0", publisher.manifest("h0", ORIN, seq, art,
                                                       publisher.golden(tmp_path / f"v{seq}.onnx")))
            return art["sha256"]

        # 1. The body breaks off: an outage, retried; then installed.
        s3.fault("short", method="GET", path=MANIFEST, times=1)
        sha = publish(1)
        wait_for(lambda: dev.running_sha() == sha, 120, "v1 installed after a body cut short")
        assert dev.saw("broke off") and not dev.saw("refused manifest")

        # 2. Cut along with its Content-Length: refused as not JSON, read again, installed.
        s3.fault("truncate", method="GET", path=MANIFEST, times=1)
        sha = publish(2)
        wait_for(lambda: dev.running_sha() == sha, 120, "v2 installed after a truncated manifest")
        refused = [line for line in dev.lines if "refused manifest" in line]
        assert len(refused) == 1 and "not JSON" in refused[0], refused

        # 3. A trickle: cut off at the deadline (5 s reads, 15 s per call), then installed.
        s3.fault("trickle", method="GET", path=MANIFEST, times=1, interval=1.0, duration=600)
        sha = publish(3)
        wait_for(lambda: dev.running_sha() == sha, 120, "v3 installed after a trickled manifest")
        assert dev.saw("deadline")

        assert dev.proc.poll() is None
        assert not dev.saw("Traceback")
    finally:
        s3.close()
