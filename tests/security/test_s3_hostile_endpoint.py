"""The S3 read path against a misbehaving endpoint (tests/hostile_s3.py), with both clients.

Each hostile answer must become one clear :class:`StoreUnavailable` line (the caller retries later),
never a short object passed off as whole, a call that lasts as long as the server likes, a listing
held whole in memory, or an uncaught exception:

- a body shorter than its Content-Length (read whole, read under a cap as manifests are, streamed);
- a server that trickles its answer, or only its body, a byte at a time (cut off at the deadline);
- a 300 MB listing page, a listing that never ends, a listing that is not XML;
- a 500 whose body is not XML, a Content-Length that is not a number, a status line that is not
  HTTP, 100 KB of headers, a HEAD without Date and Last-Modified.

``edgeslim fleet list`` through it (a real process, slow tier) says each in one line and exits 2.
The endpoint keeps its objects in memory here; tests/security/test_agent_hostile_s3.py puts it
in front of RGW and real agents.
"""

from __future__ import annotations

import tracemalloc

import pytest

from edgeslim.components.common.errors import FleetError
from edgeslim.deploy.store import S3Store, StoreUnavailable
from tests.hostile_s3 import HostileS3

KEY = "fleets/f/devices/d0/manifest.json"
DATA = b'{"signed": {"sequence": 1, "pad": "' + b"x" * 20_000 + b'"}, "signatures": []}'


@pytest.fixture(scope="module")
def s3():
    server = HostileS3()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stores(s3):
    """The store through the hostile endpoint, once per client (a boto3 client takes a second to make)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "hostile")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "hostile")
        yield {c: S3Store("b", "p", endpoint_url=s3.endpoint, timeout_s=2, deadline_s=3, client=c)
               for c in ("boto3", "light")}


@pytest.fixture(params=["boto3", "light"])
def store(request, s3, stores):
    """One client's store (``light`` is what a device without boto3 has), the object in place, no fault set."""
    s3.clear()
    s = stores[request.param]
    s.put(KEY, DATA)
    yield s
    s3.clear()


def _one_line_refusal(call) -> str:
    with pytest.raises(FleetError) as err:
        call()
    assert isinstance(err.value, StoreUnavailable), repr(err.value)
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_whole_object_still_reads(store):
    assert store.get(KEY).data == DATA and store.get(KEY, max_bytes=1 << 20).data == DATA
    assert store.list("fleets/f/") == [KEY] and store.head(KEY)[0] == len(DATA)
    assert store.age(KEY)[1] >= 0


@pytest.mark.parametrize("how", ["whole", "capped", "streamed"])
def test_a_body_shorter_than_its_length_is_an_outage(store, s3, how):
    s3.fault("short", method="GET", path=r"manifest\.json")
    read = {"whole": lambda: store.get(KEY), "capped": lambda: store.get(KEY, max_bytes=1 << 20),
            "streamed": lambda: b"".join(store.stream(KEY))}[how]
    assert "broke off" in _one_line_refusal(read)
    s3.clear()
    assert read() in (DATA, store.get(KEY))  # the next try reads the whole object


@pytest.mark.parametrize("mode", ["trickle", "trickle-body"])
def test_a_trickling_server_is_cut_off_at_the_deadline(store, s3, mode):
    s3.fault(mode, method="GET", path=r"manifest\.json", interval=0.5, duration=60)  # each byte within timeout_s
    text = _one_line_refusal(lambda: store.get(KEY, max_bytes=1 << 20))
    assert "deadline" in text, text


def test_a_huge_listing_is_refused_within_its_cap(store, s3):
    s3.fault("huge-listing", method="GET", path=r"list-type=2", size=300 << 20)
    tracemalloc.start()
    try:
        text = _one_line_refusal(lambda: store.list("fleets/f/"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "over" in text, text
    assert peak < 64 << 20, f"reading a refused listing took {peak >> 20} MB"


@pytest.mark.parametrize("mode, call", [
    ("endless-listing", "list"), ("garbage-xml", "list"), ("garbage-error", "get"), ("bad-length", "get"),
    ("bad-status", "get"), ("huge-headers", "get"), ("huge-headers", "list"), ("no-date", "age"),
    ("garbage-xml", "get"),
])
def test_a_hostile_answer_is_one_clear_error(store, s3, mode, call):
    s3.fault(mode)
    run = {"list": lambda: store.list("fleets/f/"), "get": lambda: store.get(KEY, max_bytes=1 << 20),
           "age": lambda: store.age(KEY)}[call]
    if (mode, call) == ("garbage-xml", "get"):
        # A 200 whose body is whatever it is: the store hands it on, and the JSON guard refuses it.
        with pytest.raises(FleetError, match="is not JSON"):
            store.get_json(KEY)
        return
    _one_line_refusal(run)
    s3.clear()
    run()  # a sane answer next time reads as usual


@pytest.mark.slow
@pytest.mark.parametrize("client", ["boto3", "light"])
def test_the_cli_says_one_line_and_exits(s3, client):
    """``edgeslim fleet list`` through the hostile endpoint: each answer is one error line, exit 2."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, AWS_ACCESS_KEY_ID="hostile", AWS_SECRET_ACCESS_KEY="hostile", EDGESLIM_S3_CLIENT=client)
    for mode in ("garbage-xml", "huge-listing", "endless-listing", "bad-status", "huge-headers"):
        s3.clear()
        s3.fault(mode)
        out = subprocess.run([sys.executable, "-m", "edgeslim", "fleet", "list", "lab", "--store", "s3://b/p",
                              "--endpoint-url", s3.endpoint], capture_output=True, text=True, env=env, timeout=600)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("edgeslim: error: "), (mode, out.stderr)
        assert "Traceback" not in out.stderr + out.stdout
    s3.clear()
