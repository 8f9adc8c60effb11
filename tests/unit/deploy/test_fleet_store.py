"""The store interface: conditional writes, ETag polls, ranged reads.

The same checks run on the local-directory store and, through moto's server
(the fast stand-in; real-S3 behaviour is checked on Ceph RGW in the
integration tests), on the S3 store.
"""

from __future__ import annotations

import os
import socket

import pytest

from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.deploy.bounded import BoundedInputError
from edgeslim.deploy.store import (FleetKeys, LocalStore, NoSuchObject, NotModified, PreconditionFailed, S3Store,
                                   StoreUnavailable, open_store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3-moto", "s3-moto-light"])
def any_store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStore(tmp_path / "s")
    endpoint = request.getfixturevalue("moto_endpoint")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # boto3, and edgeslim's own standard-library client (what an agent without boto3 uses); the slow
    # tier checks both against a real S3 server (tests/integration/fleet/test_store_clients.py).
    return S3Store(f"b{os.getpid()}{abs(hash(request.node.name)) % 10**6}", "pre/fix",
                   endpoint_url=endpoint, create_bucket=True,
                   client="light" if request.param == "s3-moto-light" else "boto3")


def test_create_once_put_is_a_lock(any_store):
    any_store.put("lock.json", b"a", if_none_match_any=True)
    with pytest.raises(PreconditionFailed):
        any_store.put("lock.json", b"b", if_none_match_any=True)
    assert any_store.get("lock.json").data == b"a"


def test_if_match_replaces_only_the_version_it_read(any_store):
    etag = any_store.put("k", b"one")
    with pytest.raises(PreconditionFailed):
        any_store.put("k", b"two", if_match="0" * 32)
    etag2 = any_store.put("k", b"two", if_match=etag)
    assert etag2 != etag and any_store.get("k").data == b"two"


def test_poll_with_etag_says_not_modified_until_it_changes(any_store):
    etag = any_store.put("m", b"v1")
    with pytest.raises(NotModified):
        any_store.get("m", if_none_match=etag)
    any_store.put("m", b"v2")
    assert any_store.get("m", if_none_match=etag).data == b"v2"


def test_ranged_stream_resumes_mid_object(any_store):
    data = os.urandom(200_000)
    any_store.put("big", data)
    assert b"".join(any_store.stream("big", start=123_456, chunk_size=8192)) == data[123_456:]
    assert any_store.head("big")[0] == len(data)


def test_missing_keys_and_listing(any_store):
    assert any_store.get("nope") is None and any_store.head("nope") is None
    any_store.put("a/x.json", b"1")
    any_store.put("a/y.json", b"2")
    any_store.put("b/z.json", b"3")
    assert any_store.list("a/") == ["a/x.json", "a/y.json"]
    any_store.delete("a/x.json")
    assert any_store.list("a/") == ["a/y.json"]


def test_unreachable_s3_is_reported_as_unavailable(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s = S3Store("b", endpoint_url=f"http://127.0.0.1:{_free_port()}", timeout_s=1)
    with pytest.raises(StoreUnavailable, match="cannot reach"):
        s.get("x")


def test_describe_never_shows_credentials(monkeypatch, moto_endpoint):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSHOULDNOTSHOW")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    s = open_store("s3://bkt/p", endpoint_url=moto_endpoint)
    assert "supersecretvalue" not in s.describe() and "AKIDSHOULDNOTSHOW" not in s.describe()
    assert s.describe() == f"s3://bkt/p at {moto_endpoint}"


def test_store_urls_and_names_are_checked(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    with pytest.raises(ConfigError, match="expected s3://"):
        open_store("gs://bucket/x")
    with pytest.raises(ConfigError, match="fleet name"):
        FleetKeys("bad/name")
    with pytest.raises(ConfigError, match="relative"):
        LocalStore(tmp_path).get("../etc/passwd")
    with pytest.raises(FleetError, match="relative without '..'"):
        LocalStore(tmp_path).put("/etc/passwd", b"x")


def test_max_bytes_refuses_an_oversized_object_from_its_size(any_store):
    data = b'{"a": "' + b"x" * 5000 + b'"}'
    etag = any_store.put("big.json", data)
    with pytest.raises(BoundedInputError, match=f"big.json is {len(data)} bytes, over the cap of 1024: refused unread") \
            as got:
        any_store.get("big.json", max_bytes=1024)
    assert got.value.reason == "oversized" and got.value.etag == etag
    with pytest.raises(NotModified):  # the refused object's ETag polls past it
        any_store.get("big.json", if_none_match=etag, max_bytes=1024)
    assert any_store.get("big.json", max_bytes=len(data)).data == data
    with pytest.raises(FleetError, match="refused unread"):
        any_store.get_json("big.json", max_bytes=1024)
    any_store.put("bomb.json", b"[" * 2000 + b"]" * 2000)
    with pytest.raises(FleetError, match="levels deep"):  # refused, never a RecursionError
        any_store.get_json("bomb.json")


def test_missing_object_stream_is_no_such_object(any_store):
    with pytest.raises(NoSuchObject, match="nope does not exist"):
        b"".join(any_store.stream("nope"))


def test_s3_oversized_get_never_reads_the_body(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s = S3Store("b", endpoint_url=f"http://127.0.0.1:{_free_port()}", timeout_s=1)

    class Body:
        closed = False

        def read(self, *a):
            raise AssertionError("the body of an oversized object was read")

        def close(self):
            Body.closed = True

    monkeypatch.setattr(s._client, "get_object", lambda **kw: {"ContentLength": 300 << 20, "ETag": '"e1"',
                                                               "Body": Body()})
    with pytest.raises(BoundedInputError, match="314572800 bytes, over the cap of 1024") as got:
        s.get("m.json", max_bytes=1024)
    assert got.value.etag == "e1" and Body.closed
