"""A small S3 client on the standard library: exactly what :class:`~edgeslim.deploy.store.S3Store` calls.

The fleet store's S3 without boto3 (the device agent's install is about 45 MB smaller, its idle
process about 35 MB lighter). It speaks AWS Signature Version 4 in the ``Authorization`` header
(the payload's sha256 is signed; a session token when there is one), addresses buckets path-style
(``<endpoint>/<bucket>/<key>``), gives up on a connect or a read after ``timeout_s``, and keeps a
small pool of keep-alive connections that any number of threads share (a controller, or the
fleet benchmark's 100 simulated devices, uses one client).

Every answer is bounded (a deadline per call, a body checked against its length, a listing
parsed as it arrives, under caps): :mod:`edgeslim.deploy.s3transport` carries the calls.

Credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, then the
shared credentials file (``AWS_SHARED_CREDENTIALS_FILE`` or ``~/.aws/credentials``, then
``AWS_CONFIG_FILE`` or ``~/.aws/config``), profile from the ``profile`` argument, ``AWS_PROFILE``,
else ``default``; as in boto3, an explicit ``profile`` argument reads that profile even when the
environment has keys. Instance roles, web identity, SSO and credential processes need boto3 (with
it installed, the store uses it). Region: the argument, ``AWS_REGION``, ``AWS_DEFAULT_REGION``,
else ``us-east-1``. Endpoint: the argument, ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, else
``https://s3.<region>.amazonaws.com``. HTTPS verifies certificates against the system's CAs, or
``AWS_CA_BUNDLE``; proxies (``HTTPS_PROXY``) are not used.

Retries: a pooled connection the server closed while idle is replaced at once; a request that
could not connect, or got 502/503/504, is tried once more after a short random pause; a read that
timed out is not repeated (a conditional PUT may have landed). A device whose clock is off by more
than S3's 15 minutes (``RequestTimeTooSkewed``) signs again with the server's clock.

Imports nothing outside the standard library, ``edgeslim.components.common.errors`` and
:mod:`edgeslim.deploy.s3transport` (tests/integration/fleet/test_store_clients.py checks).
"""

from __future__ import annotations

import configparser
import datetime as dt
import hashlib
import hmac
import http.client
import os
import random
import time
import xml.etree.ElementTree as ET
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy.s3transport import (BadResponseError, ConnectTimeoutError, EndpointConnectionError,
                                         S3TransportError, Transport, deadline_for)  # noqa: F401 (the store's)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_ATTEMPTS = 2  # as the boto3 client's config: one quick retry, the callers have their own backoff
_RETRY_STATUS = (502, 503, 504)


class ClientError(Exception):
    """The server answered with an HTTP error status; ``response`` has boto3's shape."""

    def __init__(self, operation: str, status: int, code: str, message: str, headers: dict[str, str]):
        super().__init__(f"{operation}: {code} ({status}) {message}".strip())
        self.response = {"Error": {"Code": code, "Message": message}, **_meta(status, headers)}


def resolve_credentials(profile: str | None = None) -> tuple[str, str, str | None]:
    """(access key id, secret, session token or None), as described in the module docstring."""
    env = os.environ
    if not profile and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN") or None
    name = profile or env.get("AWS_PROFILE") or "default"
    files = [(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", name),
             (env.get("AWS_CONFIG_FILE") or "~/.aws/config", name if name == "default" else f"profile {name}")]
    for path, section in files:
        path = os.path.expanduser(path)
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)  # a missing file reads as empty
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not a valid AWS credentials file ({type(exc).__name__}); fix it, or set "
                              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        if parser.has_section(section):
            sec = parser[section]
            key, secret = sec.get("aws_access_key_id", "").strip(), sec.get("aws_secret_access_key", "").strip()
            if key and secret:
                return key, secret, sec.get("aws_session_token", "").strip() or None
    where = f"profile {name!r} in ~/.aws/credentials" if name != "default" else "a [default] profile in ~/.aws/credentials"
    raise ConfigError(f"no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), "
                      f"or {where}; instance roles, web identity and SSO need boto3: pip install boto3")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _uri(text: str, safe: str = "/") -> str:
    """SigV4's URI encoding: everything but A-Z a-z 0-9 - _ . ~ (and ``safe``) as %XX."""
    return quote(text, safe=safe)


class _Signer:
    """AWS Signature Version 4 for the ``s3`` service, in the ``Authorization`` header."""

    def __init__(self, key: str, secret: str, token: str | None, region: str) -> None:
        self._key, self._secret, self._token, self.region = key, secret, token, region
        self._day_keys: dict[str, bytes] = {}
        self.skew = dt.timedelta(0)  # server clock minus ours, learnt from a RequestTimeTooSkewed

    def _signing_key(self, day: str) -> bytes:
        k = self._day_keys.get(day)
        if k is None:
            k = _hmac(_hmac(_hmac(_hmac(f"AWS4{self._secret}".encode(), day), self.region), "s3"), "aws4_request")
            self._day_keys = {day: k}
        return k

    def sign(self, method: str, host: str, path: str, query: str, headers: dict[str, str],
             payload_sha256: str, now: dt.datetime | None = None) -> dict[str, str]:
        """``headers`` (lower-case names) plus host, x-amz-* and authorization; ``path`` and ``query`` as sent."""
        now = now or dt.datetime.now(dt.timezone.utc) + self.skew
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        out = dict(headers, host=host, **{"x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
        if self._token:
            out["x-amz-security-token"] = self._token
        names = sorted(k for k in out if k == "host" or k.startswith("x-amz-") or k in ("content-md5", "range"))
        canonical_headers = "".join(f"{k}:{' '.join(str(out[k]).split())}\n" for k in names)
        signed = ";".join(names)
        request = "\n".join([method, path, query, canonical_headers, signed, payload_sha256])
        scope = f"{amz_date[:8]}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(amz_date[:8]), to_sign.encode(), hashlib.sha256).hexdigest()
        out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self._key}/{scope}, SignedHeaders={signed}, "
                                f"Signature={signature}")
        return out


def _error_code(body: bytes, status: int) -> tuple[str, str]:
    """(Code, Message) of S3's XML error body; the status as the code when there is none (HEAD, 304)."""
    code, message = "", ""
    if body.lstrip().startswith(b"<"):
        try:
            for el in ET.fromstring(body).iter():
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "Code" and not code:
                    code = (el.text or "").strip()
                elif tag == "Message" and not message:
                    message = (el.text or "").strip()
        except ET.ParseError:
            pass
    return code or str(status), message or http.client.responses.get(status, "")


def _present(headers: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if v}


def _meta(status: int, headers: dict[str, str]) -> dict[str, Any]:
    """boto3's ``ResponseMetadata`` (header names lower-case)."""
    return {"ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers}}


def _http_date(value: str | None) -> dt.datetime | None:
    try:
        return parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None


class S3Client:
    """The S3 calls of the fleet store, by boto3's names (see the module docstring).

    Args:
        endpoint_url: ``http(s)://host[:port][/path]``; ``None`` for AWS (or ``$AWS_ENDPOINT_URL_S3``,
            ``$AWS_ENDPOINT_URL``).
        region: the signing region.
        profile: a profile of the shared credentials file.
        timeout_s: connect and read timeout (each wait for the server).
        deadline_s: the most one call may take, retries included (a body's deadline grows with its
            length, see the module docstring); None: 3 x ``timeout_s``.
        max_pool_connections: idle connections kept for reuse.
    """

    def __init__(self, endpoint_url: str | None = None, *, region: str | None = None, profile: str | None = None,
                 timeout_s: float = 10.0, deadline_s: float | None = None, max_pool_connections: int = 64) -> None:
        env = os.environ
        self.region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        url = (endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
               or f"https://s3.{self.region}.amazonaws.com")
        self._t = Transport(url, timeout_s=timeout_s, deadline_s=deadline_s,
                            max_pool_connections=max_pool_connections)
        self._signer = _Signer(*resolve_credentials(profile), self.region)

    # -- the calls ---------------------------------------------------------------------------------
    def get_object(self, *, Bucket: str, Key: str, IfNoneMatch: str | None = None,
                   Range: str | None = None) -> dict[str, Any]:
        headers = _present({"if-none-match": IfNoneMatch, "range": Range})
        conn, resp, hdrs = self._request("GetObject", "GET", Bucket, Key, headers=headers)
        try:
            out = self._object_meta(resp.status, hdrs)
        except BadResponseError:
            conn.close()
            raise
        out["Body"] = self._t.body(conn, resp)
        return out

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        conn, resp, hdrs = self._request("HeadObject", "HEAD", Bucket, Key)
        self._t.finish(conn, resp)
        return self._object_meta(resp.status, hdrs)

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, IfNoneMatch: str | None = None,
                   IfMatch: str | None = None) -> dict[str, Any]:
        headers = _present({"if-none-match": IfNoneMatch, "if-match": IfMatch})
        conn, resp, hdrs = self._request("PutObject", "PUT", Bucket, Key, headers=headers, body=bytes(Body))
        self._t.finish(conn, resp)
        return {"ETag": hdrs.get("etag"), **_meta(resp.status, hdrs)}

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        conn, resp, hdrs = self._request("DeleteObject", "DELETE", Bucket, Key)
        self._t.finish(conn, resp)
        return _meta(resp.status, hdrs)

    def list_objects_v2(self, *, Bucket: str, Prefix: str = "", ContinuationToken: str | None = None,
                        MaxKeys: int | None = None) -> dict[str, Any]:
        query = {"list-type": "2", "encoding-type": "url", "prefix": Prefix}
        if ContinuationToken:
            query["continuation-token"] = ContinuationToken
        if MaxKeys is not None:
            query["max-keys"] = str(int(MaxKeys))
        conn, resp, hdrs = self._request("ListObjectsV2", "GET", Bucket, None, query=query)
        out = self._t.read_listing(conn, resp)
        out.update(_meta(resp.status, hdrs))
        return out

    def head_bucket(self, *, Bucket: str) -> dict[str, Any]:
        conn, resp, hdrs = self._request("HeadBucket", "HEAD", Bucket, None)
        self._t.finish(conn, resp)
        return _meta(resp.status, hdrs)

    def create_bucket(self, *, Bucket: str) -> dict[str, Any]:
        body = b""
        if self.region != "us-east-1":  # as boto3: elsewhere AWS wants the region named
            body = ("<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
                    f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>").encode()
        conn, resp, hdrs = self._request("CreateBucket", "PUT", Bucket, None, body=body)
        self._t.finish(conn, resp)
        return _meta(resp.status, hdrs)

    # -- the plumbing ------------------------------------------------------------------------------
    def _object_meta(self, status: int, hdrs: dict[str, str]) -> dict[str, Any]:
        return {"ETag": hdrs.get("etag"), "ContentLength": self._t.content_length(hdrs),
                "LastModified": _http_date(hdrs.get("last-modified")), **_meta(status, hdrs)}

    def _request(self, operation: str, method: str, bucket: str, key: str | None, *,
                 query: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                 body: bytes | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, dict]:
        """Send one call (with the retries of the module docstring); an HTTP error status raises ClientError."""
        path = f"{self._t.base}/{_uri(bucket)}" + (f"/{_uri(key)}" if key is not None else "")
        qs = "&".join(f"{_uri(k, '')}={_uri(v, '')}" for k, v in sorted((query or {}).items()))
        url = f"{path}?{qs}" if qs else path
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        attempt, resigned = 1, False
        deadline = deadline_for(self._t.deadline_s, body)
        while True:
            signed = self._signer.sign(method, self._t.host_header, path, qs, headers or {}, payload)
            try:
                conn, resp = self._t.exchange(method, url, body, signed, deadline)
            except (EndpointConnectionError, ConnectTimeoutError):
                if attempt < MAX_ATTEMPTS and time.monotonic() < deadline:
                    attempt += 1
                    time.sleep(random.uniform(0.05, 0.5))
                    continue
                raise
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if resp.status < 300:
                return conn, resp, hdrs
            status = resp.status
            code, message = _error_code(self._t.finish(conn, resp), status)
            if status in _RETRY_STATUS and attempt < MAX_ATTEMPTS and time.monotonic() < deadline:
                attempt += 1
                time.sleep(random.uniform(0.05, 0.5))
                continue
            server_now = _http_date(hdrs.get("date"))
            if code == "RequestTimeTooSkewed" and not resigned and server_now is not None:
                self._signer.skew = server_now - dt.datetime.now(dt.timezone.utc)
                resigned = True
                continue
            raise ClientError(operation, status, code, message, hdrs)
