"""Fleet state in an object store: S3 (any S3-compatible server) or a local directory.

Both stores have the same small interface, with the two S3 features the
rollout leans on: ETag-conditional reads (devices poll cheaply) and
conditional PUTs (``If-None-Match: *`` creates a lock once; ``If-Match``
replaces it only if nobody else did). S3 goes through boto3 when it is
installed (its whole credential chain: environment, profile, instance role, web
identity, SSO) and otherwise through edgeslim's own standard-library client,
:mod:`edgeslim.deploy.s3client` (environment and shared credentials file);
``$EDGESLIM_S3_CLIENT=light|boto3`` forces one. Credentials are never stored,
logged or returned by :meth:`describe`.

Layout under the store's prefix::

    artifacts/sha256/<hex>                       content-addressed models and engines
    fleets/<fleet>/lock.json                     the per-fleet controller lock
    fleets/<fleet>/rollouts/<name>.json          one record per rollout (deployment)
    fleets/<fleet>/devices/<id>/registration.json  written by the agent
    fleets/<fleet>/devices/<id>/manifest.json    signed; written by the controller
    fleets/<fleet>/devices/<id>/status.json      written by the agent (and heartbeats)

boto3 (or the light client) is imported only when an S3 store is opened.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from edgeslim.components.common.errors import ConfigError, FleetError

STORE_ENV = "EDGESLIM_FLEET_STORE"
ENDPOINT_ENV = "EDGESLIM_S3_ENDPOINT_URL"
CLIENT_ENV = "EDGESLIM_S3_CLIENT"  # light | boto3; unset: boto3 when installed, else light
DEFAULT_LOCAL_STORE = "~/.edgeslim/fleet-store"
MAX_LIST_KEYS = 500_000  # keys one listing may return (a fleet of 100,000 devices has about 400,000)


class StoreUnavailable(FleetError):
    """The store cannot be reached right now (network, server down, 5xx)."""


class PreconditionFailed(FleetError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class NotModified(Exception):
    """A conditional read found the same ETag: nothing new."""


class NoSuchObject(FleetError):
    """A key that must exist (an artifact being downloaded) is not in the store."""


class UnsafeKey(FleetError, ConfigError):
    """A store key that would leave the store's directory (absolute, or with '..')."""


@dataclasses.dataclass
class Blob:
    data: bytes
    etag: str


def _unquote(etag: str | None) -> str:
    return (etag or "").strip().strip('"')


def _refuse_oversized(store: "ObjectStore", key: str, size: int, cap: int, etag: str):
    from edgeslim.deploy.bounded import BoundedInputError

    exc = BoundedInputError("oversized", f"{store.describe()}: {key} is {size} bytes, over the cap of {cap}: "
                                         "refused unread")
    exc.etag = etag
    raise exc


class ObjectStore:
    """The interface. Keys are relative to the store's prefix; ETags are unquoted."""

    def describe(self) -> str:
        raise NotImplementedError

    def get(self, key: str, *, if_none_match: str | None = None, max_bytes: int | None = None) -> Blob | None:
        """The object, ``None`` if absent; raises ``NotModified`` if its ETag is ``if_none_match``.

        ``max_bytes``: an object larger than this is refused from its size alone, before a byte
        of its body is read (:class:`~edgeslim.deploy.bounded.BoundedInputError` ``oversized``,
        whose ``etag`` names the refused object).
        """
        raise NotImplementedError

    def head(self, key: str) -> tuple[int, str] | None:
        """(size, etag) or ``None`` if absent."""
        raise NotImplementedError

    def stream(self, key: str, start: int = 0, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The object's bytes from ``start`` (an HTTP Range request on S3); :class:`NoSuchObject` if absent."""
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, if_none_match_any: bool = False,
            if_match: str | None = None) -> str:
        """Write; returns the new ETag. Raises ``PreconditionFailed`` if a condition fails."""
        raise NotImplementedError

    def put_file(self, key: str, path: str | Path, *, if_none_match_any: bool = False) -> str:
        return self.put(key, Path(path).read_bytes(), if_none_match_any=if_none_match_any)

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """All keys under ``prefix``, sorted."""
        raise NotImplementedError

    def age(self, key: str) -> tuple[str, float] | None:
        """(etag, seconds since the object was last written), both by the *store's* clock.

        Leases are judged with this, never with the caller's clock: a controller whose
        clock runs ahead cannot take a live lock.
        """
        raise NotImplementedError

    # JSON helpers used everywhere.
    def get_json(self, key: str, *, max_bytes: int | None = None) -> tuple[Any, str] | None:
        from edgeslim.deploy import bounded

        blob = self.get(key, max_bytes=max_bytes or bounded.MAX_MANIFEST_BYTES)
        if blob is None:
            return None
        try:
            return bounded.loads(blob.data, what=f"{self.describe()}: {key}",
                                 max_bytes=max_bytes or bounded.MAX_MANIFEST_BYTES), blob.etag
        except bounded.BoundedInputError as exc:
            raise FleetError(f"{exc}; fix or delete it") from None

    def put_json(self, key: str, obj: Any, **cond) -> str:
        return self.put(key, json.dumps(obj, indent=1, sort_keys=True).encode(), **cond)


class LocalStore(ObjectStore):
    """A directory with the S3 semantics the fleet needs (for the demo and laptops).

    Conditional writes are atomic across processes through ``flock`` on one
    lock file; every write is a rename, so readers never see half a file.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.expanduser(str(root))).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lockfile = self.root / ".store.lock"
        self._tlock = threading.Lock()
        self._big_etags: dict[tuple[int, int, int], str] = {}

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not key or key.startswith("/") or ".." in key.split("/") or "\0" in key:
            raise UnsafeKey(f"store key {str(key)[:200]!r} must be relative without '..': it would leave "
                            f"{self.describe()}")
        return self.root / key

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def _etag_of_open_file(self, fh, st: os.stat_result) -> str:
        """The ETag of a file too big to hold, hashed in chunks (cached while the file is unchanged)."""
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._big_etags.get(sig)
        if cached is None:
            h = hashlib.md5(usedforsecurity=False)
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            cached = self._big_etags[sig] = h.hexdigest()
        return cached

    def get(self, key, *, if_none_match=None, max_bytes=None):
        p = self._path(key)
        try:
            fh = open(p, "rb")
        except (FileNotFoundError, IsADirectoryError):
            return None
        with fh:
            st = os.fstat(fh.fileno())
            if max_bytes is not None and st.st_size > max_bytes:
                # Never held in memory; its real ETag, so a reader polls past what it refused.
                etag = self._etag_of_open_file(fh, st)
                if if_none_match and _unquote(if_none_match) == etag:
                    raise NotModified(key)
                _refuse_oversized(self, key, st.st_size, max_bytes, etag)
            try:
                data = fh.read()
            except IsADirectoryError:
                return None
        etag = self._etag(data)
        if if_none_match and _unquote(if_none_match) == etag:
            raise NotModified(key)
        return Blob(data, etag)

    def head(self, key):
        p = self._path(key)
        if not p.is_file():
            return None
        return p.stat().st_size, self._etag(p.read_bytes())

    def stream(self, key, start=0, chunk_size=1 << 16):
        p = self._path(key)
        try:
            fh = open(p, "rb")
        except FileNotFoundError:
            raise NoSuchObject(f"{self.describe()}: {key} does not exist") from None
        with fh:
            fh.seek(start)
            while chunk := fh.read(chunk_size):
                yield chunk

    def put(self, key, data, *, if_none_match_any=False, if_match=None):
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with self._tlock, open(self._lockfile, "a+") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                exists = p.is_file()
                if if_none_match_any and exists:
                    raise PreconditionFailed(f"{key} already exists")
                if if_match is not None:
                    if not exists or self._etag(p.read_bytes()) != _unquote(if_match):
                        raise PreconditionFailed(f"{key} changed since ETag {if_match}")
                tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, p)
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)
        return self._etag(data)

    def delete(self, key):
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def list(self, prefix):
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def age(self, key):
        p = self._path(key)
        try:
            data, st = p.read_bytes(), p.stat()
        except FileNotFoundError:
            return None
        return self._etag(data), max(0.0, time.time() - st.st_mtime)  # one host: the file system's clock


class S3Store(ObjectStore):
    """A bucket (and optional prefix) on AWS S3 or any S3-compatible server.

    Args:
        bucket: bucket name; created if missing and ``create_bucket``.
        prefix: key prefix inside the bucket.
        endpoint_url: e.g. ``http://127.0.0.1:7480`` for RGW or MinIO; ``None`` for AWS.
        region: signing region.
        profile: a named AWS profile; ``None`` uses the client's default chain.
        timeout_s: connect and read timeout: devices must notice an outage quickly.
        deadline_s: the most one call may take (a body's grows with its length; see
            :mod:`edgeslim.deploy.s3transport`); None: 3 x ``timeout_s``.
        client: ``"boto3"`` or ``"light"`` (:mod:`edgeslim.deploy.s3client`); ``None``:
            ``$EDGESLIM_S3_CLIENT``, else boto3 when it is installed, else light.
    """

    list_page_size: int | None = None  # keys per ListObjectsV2 page; None: the server's (1000 on S3)

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, profile: str | None = None, timeout_s: float = 10.0,
                 deadline_s: float | None = None, create_bucket: bool = False, client: str | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = _choose_client(client)
        if self.client == "light":
            from edgeslim.deploy import s3client

            self._client = s3client.S3Client(endpoint_url, region=region, profile=profile, timeout_s=timeout_s,
                                             deadline_s=deadline_s)
            self._ClientError, self._TransportError = s3client.ClientError, s3client.S3TransportError
        else:
            self._open_boto3(endpoint_url, region, profile, timeout_s, deadline_s)
        if create_bucket:
            self._ensure_bucket()

    def _open_boto3(self, endpoint_url, region, profile, timeout_s, deadline_s) -> None:
        import boto3
        from botocore.config import Config as BotoConfig
        from botocore.exceptions import BotoCoreError, ClientError

        from edgeslim.deploy import s3boto, s3transport

        session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
        cfg = BotoConfig(
            connect_timeout=timeout_s, read_timeout=timeout_s,
            # The agent and controller have their own backoff; one quick try here.
            retries={"max_attempts": 2, "mode": "standard"},
            # Many S3-compatible servers (RGW, older MinIO) reject the flexible
            # checksum trailers that new botocore sends by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            # A controller, or a simulated fleet, shares one client across threads.
            max_pool_connections=64,
        )
        self._client = session.client("s3", endpoint_url=endpoint_url,
                                      region_name=region or session.region_name or "us-east-1", config=cfg)
        # boto3 signs (its whole credential chain); edgeslim's bounded transport carries the calls.
        s3boto.carry(self._client, timeout_s=timeout_s, deadline_s=deadline_s)
        self._ClientError, self._TransportError = ClientError, (BotoCoreError, s3transport.S3TransportError)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}".replace(f"{self.bucket}/ at", f"{self.bucket} at")

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, fn, **kw):
        # Both clients raise the same shapes: an HTTP error with boto3's `response`, or a transport error.
        try:
            return fn(**kw)
        except self._ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("304", "NotModified") or status == 304:
                raise NotModified(kw.get("Key")) from None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise PreconditionFailed(f"{kw.get('Key')}: {code or status}") from None
            if status >= 500:
                raise StoreUnavailable(f"{self.describe()}: server error {code} ({status})") from None
            if code == "NoSuchBucket":
                raise FleetError(f"{self.describe()}: bucket {self.bucket!r} does not exist; create it first") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise FleetError(
                    f"{self.describe()}: access denied ({code}); check the credentials in the "
                    "environment or profile"
                ) from None
            raise FleetError(f"{self.describe()}: {code or status}: {err.get('Message', '')}") from None
        except self._TransportError as exc:
            # Connection refused, DNS, timeouts, an answer that is not S3's: the store is unavailable, not wrong.
            raise StoreUnavailable(f"{self.describe()}: cannot reach the store ({_transport_error(exc)})") from None

    def _ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except self._ClientError:
            pass
        except self._TransportError as exc:
            raise StoreUnavailable(f"{self.describe()}: cannot reach the store ({_transport_error(exc)})") from None

        def create(**kw):
            try:
                return self._client.create_bucket(**kw)
            except self._ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._call(create, Bucket=self.bucket)  # any other refusal: the same one line as every call

    def get(self, key, *, if_none_match=None, max_bytes=None):
        kw = {"Bucket": self.bucket, "Key": self._k(key)}
        if if_none_match:
            kw["IfNoneMatch"] = f'"{_unquote(if_none_match)}"'
        resp = self._call(self._client.get_object, **kw)
        if resp is None:
            return None
        length = resp.get("ContentLength")
        size = int(length or 0)
        if max_bytes is not None and size > max_bytes:
            resp["Body"].close()  # the headers said enough: the body is never read
            _refuse_oversized(self, key, size, max_bytes, _unquote(resp.get("ETag")))
        # No length (never on S3, but cheap to be sure): read one byte past the cap at most.
        data, want = bytearray(), None if max_bytes is None else max_bytes + 1
        try:
            while want is None or len(data) < want:
                chunk = resp["Body"].read(1 << 20 if want is None else min(1 << 20, want - len(data)))
                if not chunk:
                    break
                data += chunk
        except Exception as exc:  # a reset or a deadline mid-body is an outage, not a bug
            resp["Body"].close()
            raise StoreUnavailable(f"{self.describe()}: read of {key} broke off ({_transport_error(exc)})") from None
        if max_bytes is not None and len(data) > max_bytes:
            resp["Body"].close()
            _refuse_oversized(self, key, len(data), max_bytes, _unquote(resp.get("ETag")))
        if length is not None and len(data) != size:
            raise StoreUnavailable(f"{self.describe()}: read of {key} broke off after {len(data)} of its {size} "
                                   "bytes")
        return Blob(bytes(data), _unquote(resp.get("ETag")))

    def head(self, key):
        resp = self._call(self._client.head_object, Bucket=self.bucket, Key=self._k(key))
        if resp is None:
            return None
        if resp.get("ContentLength") is None:
            raise StoreUnavailable(f"{self.describe()}: the store answered HEAD {key} without a Content-Length")
        return int(resp["ContentLength"]), _unquote(resp.get("ETag"))

    def stream(self, key, start=0, chunk_size=1 << 16):
        kw = {"Bucket": self.bucket, "Key": self._k(key)}
        if start:
            kw["Range"] = f"bytes={start}-"
        resp = self._call(self._client.get_object, **kw)
        if resp is None:
            raise NoSuchObject(f"{self.describe()}: {key} does not exist")
        try:
            yield from resp["Body"].iter_chunks(chunk_size)
        except Exception as exc:  # a reset or a deadline mid-download: resumed on the next try
            raise StoreUnavailable(f"{self.describe()}: download of {key} broke off "
                                   f"({_transport_error(exc)})") from None

    def put(self, key, data, *, if_none_match_any=False, if_match=None):
        kw = {"Bucket": self.bucket, "Key": self._k(key), "Body": data}
        if if_none_match_any:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            # RGW compares If-Match against the bare ETag; AWS accepts either form.
            kw["IfMatch"] = _unquote(if_match)
        resp = self._call(self._client.put_object, **kw)
        return _unquote((resp or {}).get("ETag"))

    def put_file(self, key, path, *, if_none_match_any=False):
        with open(path, "rb") as fh:
            return self.put(key, fh.read(), if_none_match_any=if_none_match_any)

    def delete(self, key):
        self._call(self._client.delete_object, Bucket=self.bucket, Key=self._k(key))

    def list(self, prefix):
        out: list[str] = []
        token = None
        tokens: set[str] = set()
        full = self._k(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        while True:
            kw = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            if self.list_page_size:
                kw["MaxKeys"] = self.list_page_size
            resp = self._call(self._client.list_objects_v2, **kw) or {}
            out.extend(o["Key"][strip:] for o in resp.get("Contents", []) if str(o.get("Key", "")).startswith(full))
            if len(out) > MAX_LIST_KEYS:
                raise StoreUnavailable(f"{self.describe()}: the listing of {prefix} passed {MAX_LIST_KEYS} "
                                       "keys: refused (is the endpoint S3?)")
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
            if not token or token in tokens:
                raise StoreUnavailable(f"{self.describe()}: the listing of {prefix} says there is more but gives "
                                       "no new continuation token: refused (is the endpoint S3?)")
            tokens.add(token)
        return sorted(out)

    def age(self, key):
        resp = self._call(self._client.head_object, Bucket=self.bucket, Key=self._k(key))
        if resp is None:
            return None
        from email.utils import parsedate_to_datetime

        try:
            server_now = parsedate_to_datetime(resp["ResponseMetadata"]["HTTPHeaders"]["date"])
            return _unquote(resp.get("ETag")), max(0.0, (server_now - resp["LastModified"]).total_seconds())
        except (KeyError, TypeError, ValueError):  # no Date or Last-Modified, or not dates
            raise StoreUnavailable(f"{self.describe()}: the store answered HEAD {key} without a usable Date and "
                                   "Last-Modified (the age of a lock is judged by them)") from None


def _transport_error(exc: BaseException) -> str:
    """A transport error for one line: its name; for an answer that is not S3's, or one cut off at its
    deadline (edgeslim's transport, under either client), also what was wrong with it."""
    from edgeslim.deploy.s3transport import BadResponseError, ReadTimeoutError

    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text and isinstance(exc, (BadResponseError, ReadTimeoutError)) \
        else type(exc).__name__


def _choose_client(name: str | None) -> str:
    """``light`` or ``boto3``: the argument, ``$EDGESLIM_S3_CLIENT``, else boto3 when it is installed."""
    forced = (name or os.environ.get(CLIENT_ENV) or "").strip().lower()
    if forced not in ("", "light", "boto3"):
        raise ConfigError(f"{CLIENT_ENV}={forced!r}: use light (edgeslim's own S3 client) or boto3, "
                          "or leave it unset (boto3 when installed, else light)")
    if forced == "light":
        return "light"
    if importlib.util.find_spec("boto3") is not None:
        return "boto3"
    if forced == "boto3":
        raise ConfigError(f"{CLIENT_ENV}=boto3 but boto3 is not installed; install it with: pip install boto3 "
                          f"(or unset {CLIENT_ENV} to use edgeslim's own S3 client)")
    return "light"


_S3_URL = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<prefix>.*)$")


def open_store(url: str | None = None, *, endpoint_url: str | None = None, profile: str | None = None,
               create_bucket: bool = False, timeout_s: float = 10.0, deadline_s: float | None = None) -> ObjectStore:
    """Open the fleet store named by ``url`` (or ``$EDGESLIM_FLEET_STORE``, or the local default).

    Args:
        url: ``s3://bucket/prefix``, ``file:///dir`` or a directory path.
        endpoint_url: S3 endpoint (else ``$EDGESLIM_S3_ENDPOINT_URL``, else boto3's own
            ``$AWS_ENDPOINT_URL`` handling, else AWS).
    """
    url = url or os.environ.get(STORE_ENV) or DEFAULT_LOCAL_STORE
    m = _S3_URL.match(url)
    if m:
        endpoint_url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
        return S3Store(m["bucket"], m["prefix"], endpoint_url=endpoint_url, profile=profile,
                       create_bucket=create_bucket, timeout_s=timeout_s, deadline_s=deadline_s)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise ConfigError(f"fleet store {url!r}: expected s3://bucket/prefix, file:///dir or a directory path")
    return LocalStore(url)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, value: str) -> str:
    """Fleet, device and rollout names become key segments: keep them plain."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{kind} name {value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


class FleetKeys:
    """Key names of one fleet (see the module docstring)."""

    def __init__(self, fleet: str) -> None:
        self.fleet = check_name("fleet", fleet)
        self.base = f"fleets/{fleet}"
        self.timestamp = f"{self.base}/timestamp.json"  # the fleet key's short-lived freshness statement
        self.inventory = f"{self.base}/inventory.json"  # enrolled devices, signed by the fleet key
        self.sequences = f"{self.base}/sequences.json"  # each device's newest manifest sequence, short-lived

    @property
    def lock(self) -> str:
        return f"{self.base}/lock.json"

    def rollout(self, name: str) -> str:
        return f"{self.base}/rollouts/{check_name('rollout', name)}.json"

    def abort_request(self, name: str) -> str:
        """Written only by whoever asks a rollout to stop; its controller only reads it, so a
        controller saving its own record can never overwrite the request (no lost update)."""
        return f"{self.base}/abort-requests/{check_name('rollout', name)}.json"

    @property
    def rollouts_prefix(self) -> str:
        return f"{self.base}/rollouts/"

    @property
    def devices_prefix(self) -> str:
        return f"{self.base}/devices/"

    def device(self, device_id: str, what: str) -> str:
        return f"{self.base}/devices/{check_name('device', device_id)}/{what}.json"

    def registration(self, device_id: str) -> str:
        return self.device(device_id, "registration")

    def manifest(self, device_id: str) -> str:
        return self.device(device_id, "manifest")

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def root(self, version: int) -> str:
        """Root document ``version`` (TUF-style: every version kept, walked in order)."""
        return f"{self.base}/root/{int(version)}.root.json"

    def target(self, sha256: str) -> str:
        """What the controller signed to install one artifact (for rollbacks to it)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise FleetError(f"target {sha256[:80]!r} is not a sha256")
        return f"{self.base}/targets/{sha256}.json"
