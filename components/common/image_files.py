"""Where an image dataset's files are: a local folder or an S3 prefix (any S3 endpoint).

A :class:`Files` lists keys under its root with their sizes (one listing call per 1,000 keys
on S3) and reads one key's bytes at a time, so providers learn a dataset's layout without
reading its images, and images are read only when a batch needs them. Reads may run on
several threads at once (boto3 clients are thread-safe; each read is one GET).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from edgeslim.components.common.errors import ConfigError, DataError

# The S3 endpoint for S3-compatible stores (RGW, MinIO), as the fleet store reads it; then boto3's own.
ENDPOINT_ENVS = ("EDGESLIM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """``endpoint_url``, else ``$EDGESLIM_S3_ENDPOINT_URL``, else ``$AWS_ENDPOINT_URL`` (None: AWS)."""
    return endpoint_url or next((os.environ[k] for k in ENDPOINT_ENVS if os.environ.get(k)), None)


class Files:
    """Keys under a root: ``list`` (key -> size), ``read`` (bytes), ``read_head`` (the first bytes)."""

    root = ""

    def url(self, key: str) -> str:
        """Where ``key`` is, for messages."""
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` (a folder, relative to the root; recursive) with its size."""
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def read_head(self, key: str, n: int = 65536) -> bytes:
        return self.read(key)[:n]

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        # Clients, locks and counters are per process: a copy makes its own.
        state = dict(self.__dict__)
        state.pop("_client", None)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class LocalFiles(Files):
    """A local folder."""

    def __init__(self, root: str | Path):
        self.root = str(Path(root).expanduser())
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return Path(self.root) / key if key else Path(self.root)

    def _file(self, key: str) -> str:
        return os.path.join(self.root, key)  # string joins: a listing or a read per image stays cheap

    def list(self, prefix: str = "") -> dict[str, int]:
        base = str(self._path(prefix))
        if not os.path.isdir(base):
            return {}
        out: dict[str, int] = {}
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            under = "" if rel == os.curdir else rel.replace(os.sep, "/") + "/"
            for name in sorted(filenames):
                try:
                    out[under + name] = os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
        return out

    def read(self, key: str) -> bytes:
        try:
            with open(self._file(key), "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataError(f"data {self.url(key)}: cannot be read ({exc.strerror or exc}); check the path "
                            "and its permissions") from None

    def read_head(self, key: str, n: int = 65536) -> bytes:
        try:
            with open(self._file(key), "rb") as f:
                return f.read(n)
        except OSError as exc:
            raise DataError(f"data {self.url(key)}: cannot be read ({exc.strerror or exc}); check the path "
                            "and its permissions") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def is_dir(self, key: str) -> bool:
        return self._path(key).is_dir()

    def subdirs(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


class S3Files(Files):
    """An ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint; credentials from boto3's chain."""

    def __init__(self, url: str, endpoint_url: str | None = None):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"data.args: {url!r} names no bucket; use s3://bucket/prefix")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.root = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = s3_endpoint(endpoint_url)
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if getattr(self, "_client", None) is None:
                import boto3
                from botocore.config import Config as BotoConfig

                cfg = BotoConfig(
                    retries={"max_attempts": 4, "mode": "standard"},
                    # S3-compatible servers (RGW, older MinIO) reject botocore's checksum trailers.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    s3={"addressing_style": "path"} if self.endpoint_url else {},
                    # decode threads share the client
                    max_pool_connections=32,
                )
                session = boto3.session.Session()
                self._client = session.client("s3", endpoint_url=self.endpoint_url, config=cfg,
                                              region_name=session.region_name or "us-east-1")
            return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _fail(self, key: str, exc: Exception) -> DataError:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
        why = code or str(exc).splitlines()[0][:120]
        return DataError(f"data {self.url(key)}{where}: cannot be read from S3 ({why}); check the URI, "
                         "data.args.endpoint_url (or $EDGESLIM_S3_ENDPOINT_URL) and the credentials")

    def list(self, prefix: str = "") -> dict[str, int]:
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._key(prefix)
        base = base + "/" if base else ""
        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                    if rel and not rel.endswith("/"):
                        out[rel] = int(obj["Size"])
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(prefix, exc) from None
        return dict(sorted(out.items()))

    def _get(self, key: str, **kw) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kw)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from None

    def read(self, key: str) -> bytes:
        return self._get(key)

    def read_head(self, key: str, n: int = 65536) -> bytes:
        return self._get(key, Range=f"bytes=0-{n - 1}")

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError:
            return False

    def subdirs(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._key(prefix)
        base = base + "/" if base else ""
        out: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                               Delimiter="/"):
                out += [p["Prefix"][len(base):].strip("/") for p in page.get("CommonPrefixes", [])]
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(prefix, exc) from None
        return sorted(out)

    def is_dir(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._key(key).rstrip("/") + "/"
        try:
            return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=base, MaxKeys=1).get("KeyCount"))
        except (BotoCoreError, ClientError) as exc:
            raise self._fail(key, exc) from None


def open_files(location: str, endpoint_url: str | None = None) -> Files:
    """The files under ``location``: ``s3://bucket/prefix`` or a local folder."""
    if not location:
        raise ConfigError("data.args.root: required; give a local folder or an s3://bucket/prefix")
    if str(location).startswith("s3://"):
        return S3Files(str(location), endpoint_url)
    return LocalFiles(location)


def split_location(location: str) -> tuple[str, str]:
    """A file's folder and name: ``s3://b/p/data.yaml`` -> (``s3://b/p``, ``data.yaml``)."""
    location = str(location).rstrip("/")
    head, _, name = location.rpartition("/")
    if location.startswith("s3://") and head == "s3:/":
        return location, ""
    return (head or "."), name
