"""The S3 store's contract with both clients, boto3 and edgeslim's own (deploy/s3client.py), on Ceph RGW.

Every contract test runs twice, with ``EDGESLIM_S3_CLIENT=boto3`` and ``=light``, against the real
RGW the fleet tests start (tests/fleet_fixtures.py): conditional GETs, create-once and
replace-only-if-unchanged PUTs, listing across pages, deletes, missing keys, a wrong secret and a
stopped server, which must give the same answers and the same one-line errors. Then what only the
light client has to prove: it signs from the shared credentials file, it is safe across threads,
it is what a machine without boto3 gets, and it imports nothing outside the standard library.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading

import pytest

from edgeslim.components.common.errors import ConfigError, FleetError
from edgeslim.deploy.store import (CLIENT_ENV, NoSuchObject, NotModified, PreconditionFailed, StoreUnavailable,
                                   open_store)
from tests.fleet_it_helpers import REPO, FlakyProxy

pytestmark = pytest.mark.slow
CLIENTS = ["boto3", "light"]


@pytest.fixture(params=CLIENTS)
def store(request, rgw, s3_url, monkeypatch):
    """The test's fresh prefix on RGW, opened with one client, chosen as a user does: the environment."""
    monkeypatch.setenv(CLIENT_ENV, request.param)
    s = open_store(s3_url, endpoint_url=rgw["S3_ENDPOINT_URL"])
    assert s.client == request.param
    return s


def test_conditional_get_is_not_modified_until_the_object_changes(store):
    etag = store.put("fleets/lab/devices/d0/manifest.json", b'{"seq": 1}')
    with pytest.raises(NotModified):
        store.get("fleets/lab/devices/d0/manifest.json", if_none_match=etag)
    store.put("fleets/lab/devices/d0/manifest.json", b'{"seq": 2}')
    blob = store.get("fleets/lab/devices/d0/manifest.json", if_none_match=etag)
    assert blob.data == b'{"seq": 2}' and blob.etag != etag
    etag2, seconds = store.age("fleets/lab/devices/d0/manifest.json")
    assert etag2 == blob.etag and 0 <= seconds < 600  # judged by the server's clock


def test_create_once_and_replace_only_if_unchanged(store):
    store.put("fleets/lab/lock.json", b"controller-a", if_none_match_any=True)
    with pytest.raises(PreconditionFailed):
        store.put("fleets/lab/lock.json", b"controller-b", if_none_match_any=True)
    blob = store.get("fleets/lab/lock.json")
    assert blob.data == b"controller-a"
    with pytest.raises(PreconditionFailed):
        store.put("fleets/lab/lock.json", b"stale", if_match="0" * 32)
    renewed = store.put("fleets/lab/lock.json", b"controller-a, renewed", if_match=blob.etag)
    with pytest.raises(PreconditionFailed):  # the ETag it read is gone now
        store.put("fleets/lab/lock.json", b"late", if_match=blob.etag)
    assert store.get("fleets/lab/lock.json").etag == renewed


def test_listing_pages_deletes_and_missing_keys(store):
    names = [f"fleets/lab/devices/dev{i:02d}/status.json" for i in range(8)] + ["fleets/lab/devices/odd name+ü.json"]
    for n in names:
        store.put(n, n.encode())
    store.put("fleets/other/x.json", b"not listed")
    store.list_page_size = 3  # four pages of ListObjectsV2, continuation tokens between them
    assert store.list("fleets/lab/devices/") == sorted(names)
    store.delete(names[0])
    store.delete("fleets/lab/never-there.json")  # deleting what is absent is no error
    assert store.list("fleets/lab/devices/") == sorted(names[1:])
    assert store.get(names[0]) is None and store.head(names[0]) is None and store.age(names[0]) is None
    with pytest.raises(NoSuchObject, match="does not exist"):
        b"".join(store.stream(names[0]))
    data = os.urandom(300_000)
    store.put("artifacts/sha256/big", data)
    assert store.head("artifacts/sha256/big")[0] == len(data)
    assert b"".join(store.stream("artifacts/sha256/big", start=123_457, chunk_size=8192)) == data[123_457:]


def test_a_wrong_secret_is_the_access_denied_line(request, rgw, s3_url, monkeypatch):
    lines = {}
    for client in CLIENTS:
        monkeypatch.setenv(CLIENT_ENV, client)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        s = open_store(s3_url, endpoint_url=rgw["S3_ENDPOINT_URL"])
        with pytest.raises(FleetError) as got:
            s.get("fleets/lab/lock.json")
        lines[client] = str(got.value)
        assert "not-the-secret" not in lines[client] and rgw["AWS_ACCESS_KEY_ID"] not in lines[client]
    assert lines["light"] == lines["boto3"] == (
        f"{s.describe()}: access denied (SignatureDoesNotMatch); check the credentials in the environment or profile")


@pytest.mark.parametrize("client", CLIENTS)
def test_a_stopped_server_is_store_unavailable(client, rgw, s3_url, monkeypatch):
    proxy = FlakyProxy(int(rgw["S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    monkeypatch.setenv(CLIENT_ENV, client)
    s = open_store(s3_url, endpoint_url=proxy.endpoint, timeout_s=2)
    s.put("k", b"v")
    assert s.get("k").data == b"v"  # a pooled keep-alive connection is open now
    proxy.close()  # the server goes away: the open connection is cut, new ones are refused
    for call in (lambda: s.get("k"), lambda: s.put("k", b"w"), lambda: s.list("")):
        with pytest.raises(StoreUnavailable, match=r"cannot reach the store \((EndpointConnectionError|"
                                                   r"ConnectionClosedError)\)$"):
            call()


def test_both_clients_read_what_the_other_wrote(rgw, s3_url, monkeypatch):
    stores = {}
    for client in CLIENTS:
        monkeypatch.setenv(CLIENT_ENV, client)
        stores[client] = open_store(s3_url, endpoint_url=rgw["S3_ENDPOINT_URL"])
    etag = stores["light"].put("a.json", b"from light")
    assert stores["boto3"].get("a.json").etag == etag == stores["boto3"].head("a.json")[1]
    etag = stores["boto3"].put("b.json", b"from boto3")
    assert stores["light"].get("b.json").etag == etag and stores["light"].get("b.json").data == b"from boto3"


def test_light_client_signs_with_a_profile_of_the_shared_credentials_file(rgw, s3_url, monkeypatch, tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n"
                     f"[fleet]\naws_access_key_id = {rgw['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {rgw['AWS_SECRET_ACCESS_KEY']}\n")
    monkeypatch.setenv(CLIENT_ENV, "light")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "fleet")
    s = open_store(s3_url, endpoint_url=rgw["S3_ENDPOINT_URL"])
    etag = s.put("p.json", b"signed from the file")
    assert s.get("p.json").etag == etag and s.get("p.json").data == b"signed from the file"
    with pytest.raises(ConfigError, match=r"^no S3 credentials: set AWS_ACCESS_KEY_ID .* profile 'lab' in "):
        open_store(s3_url, endpoint_url=rgw["S3_ENDPOINT_URL"], profile="lab")


def test_light_client_is_safe_across_threads(rgw, s3_url, monkeypatch):
    """One store, 32 threads (a controller, or the fleet benchmark's devices): every answer is its own."""
    monkeypatch.setenv(CLIENT_ENV, "light")
    s = open_store(s3_url, endpoint_url=rgw["S3_ENDPOINT_URL"])
    etags = {i: s.put(f"d/{i}.json", b"x" * i) for i in range(32)}
    wrong: list[str] = []

    def device(i: int) -> None:
        for _ in range(10):
            try:
                s.get(f"d/{i}.json", if_none_match=etags[i])
                wrong.append(f"{i}: modified")
            except NotModified:
                pass
            blob = s.get(f"d/{(i + 1) % 32}.json")
            if blob.data != b"x" * ((i + 1) % 32):
                wrong.append(f"{i}: got {len(blob.data)} bytes")

    threads = [threading.Thread(target=device, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not wrong, wrong[:5]
    assert len(s._client._t.pool._idle) <= 32  # connections are reused, not one per request


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env))


def test_without_boto3_the_light_client_is_chosen_and_a_forced_boto3_says_what_to_install(tmp_path):
    hide = "import sys; sys.modules['boto3'] = None; from edgeslim.deploy.store import open_store; "
    out = _python(hide + "s = open_store('s3://b/p', endpoint_url='http://127.0.0.1:9'); "
                  "print(s.client, 'botocore' in sys.modules)", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
    assert out.returncode == 0 and out.stdout.split() == ["light", "False"], out.stderr
    cli = _python(hide + "from edgeslim.deploy.agent.device import main; raise SystemExit(main(['--store', "
                  "'s3://b/p', '--endpoint-url', 'http://127.0.0.1:9', '--fleet', 'lab', '--device-class', "
                  f"'orin-sm87-jp6.1-trt10.3', '--root', '{tmp_path / 'root.json'}', '--state-dir', '{tmp_path}']))",
                  **{CLIENT_ENV: "boto3"})
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [
        f"edgeslim-agent: error: {CLIENT_ENV}=boto3 but boto3 is not installed; install it with: pip install boto3 "
        f"(or unset {CLIENT_ENV} to use edgeslim's own S3 client)"]
    bad = _python("from edgeslim.deploy.store import open_store; open_store('s3://b/p')", **{CLIENT_ENV: "urllib"})
    assert bad.returncode != 0 and f"{CLIENT_ENV}='urllib': use light" in bad.stderr


@pytest.mark.parametrize("module", ["s3client", "s3transport"])
def test_light_client_imports_only_the_standard_library_and_edgeslim_errors(module):
    tree = ast.parse((REPO / "deploy" / f"{module}.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = sorted(m for m in imported if m.split(".")[0] not in sys.stdlib_module_names
                     and m not in ("__future__", "edgeslim.components.common.errors", "edgeslim.deploy.s3transport"))
    assert not outside, outside


@pytest.mark.parametrize("client", CLIENTS)
def test_a_body_cut_short_is_an_outage_never_a_short_object(client, rgw, s3_url, monkeypatch):
    """A connection that dies mid-body (Content-Length not reached) must not pass for the whole object."""
    proxy = FlakyProxy(int(rgw["S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    monkeypatch.setenv(CLIENT_ENV, client)
    s = open_store(s3_url, endpoint_url=proxy.endpoint, timeout_s=5)
    data = os.urandom(400_000)
    s.put("artifacts/sha256/cut", data)
    try:
        proxy.set("cut", cut_after=100_000)  # every connection from now on dies after 100 kB
        got = bytearray()
        with pytest.raises(StoreUnavailable, match="download of artifacts/sha256/cut broke off"):
            for chunk in s.stream("artifacts/sha256/cut", chunk_size=8192):
                got += chunk
        assert 0 < len(got) < len(data) and data.startswith(bytes(got))
        with pytest.raises(StoreUnavailable, match="broke off"):
            s.get("artifacts/sha256/cut")
        proxy.set("pass")
        assert b"".join(s.stream("artifacts/sha256/cut", start=len(got))) == data[len(got):]  # resumes
    finally:
        proxy.close()


def test_light_client_signs_aws_published_examples():
    """The two header-auth examples of AWS's "Signature Version 4: Authenticating Requests (AWS S3)" page."""
    import datetime as dt

    from edgeslim.deploy.s3client import EMPTY_SHA256, _Signer

    signer = _Signer("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", None, "us-east-1")
    when = dt.datetime(2013, 5, 24, tzinfo=dt.timezone.utc)
    get = signer.sign("GET", "examplebucket.s3.amazonaws.com", "/test.txt", "", {"range": "bytes=0-9"},
                      EMPTY_SHA256, now=when)
    assert get["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    listed = signer.sign("GET", "examplebucket.s3.amazonaws.com", "/", "max-keys=2&prefix=J", {}, EMPTY_SHA256,
                         now=when)
    assert listed["authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")
    with_token = _Signer("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "tok", "us-east-1")
    signed = with_token.sign("GET", "h", "/b/k", "", {}, EMPTY_SHA256, now=when)
    assert signed["x-amz-security-token"] == "tok" and "x-amz-security-token" in signed["authorization"]
