"""The HTTP under the fleet store's S3: pooled connections whose every answer is bounded.

:mod:`edgeslim.deploy.s3client` (edgeslim's own S3 client) sends its signed calls through a
:class:`Transport`, and so does boto3 when the store uses it (``deploy/s3boto.py``): one piece of
code decides how long an answer may take and how much of it is read.

Every answer may be hostile (a broken proxy, a compromised endpoint), so each is bounded:

- a whole call has a deadline (``deadline_s``, 3 x ``timeout_s`` unless given): every read and
  write on its socket waits at most ``timeout_s`` and never past the deadline, so a server that
  trickles a byte at a time is cut off (:class:`ReadTimeoutError`); a body sent adds its length
  over ``MIN_BODY_RATE`` to the deadline, and each read of a body received has a deadline of its
  own (``deadline_s`` plus what it asks for at ``MIN_BODY_RATE``), so a large object on a slow
  link still goes through, and a download paced under a rate cap is not cut off between reads;
- a body that ends before its ``Content-Length`` raises :class:`ConnectionClosedError`, never
  passes for the whole object;
- a listing page is parsed as it arrives, at most ``MAX_LIST_PAGE_BYTES`` and ``MAX_LIST_PAGE_KEYS``;
  other answers (errors, the answers to PUT, HEAD, DELETE) are read up to ``MAX_SMALL_BODY``;
- a status line, header or XML body that does not parse raises :class:`BadResponseError`.

Each failure is an :class:`S3TransportError` named as botocore names the same failure
(``EndpointConnectionError``, ``ConnectTimeoutError``, ``ReadTimeoutError``, ...): the store says
"cannot reach the store" in one line, and its callers retry later.

Imports nothing outside the standard library and ``edgeslim.components.common.errors``
(tests/integration/fleet/test_store_clients.py checks).
"""

from __future__ import annotations

import datetime as dt
import http.client
import os
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Iterator
from urllib.parse import unquote_plus, urlsplit

from edgeslim.components.common.errors import ConfigError

IDLE_S = 30.0  # a pooled connection idle longer than this is closed rather than reused
MIN_BODY_RATE = 64 << 10  # bytes/s: what a body sent, or a read of a body received, adds to a deadline
MAX_LIST_PAGE_BYTES = 8 << 20  # S3 sends at most 1000 keys of at most 1 KiB each per page: about 1.5 MB
MAX_LIST_PAGE_KEYS = 1000
MAX_SMALL_BODY = 64 << 10  # an error body, or the answer to a PUT, HEAD or DELETE


class S3TransportError(Exception):
    """No answer from the server (named as botocore names the same failure)."""


class EndpointConnectionError(S3TransportError):
    """Connection refused, no route, DNS."""


class ConnectTimeoutError(S3TransportError):
    """The connection was not accepted within the timeout."""


class ReadTimeoutError(S3TransportError):
    """The server accepted the request and said nothing within the timeout."""


class ConnectionClosedError(S3TransportError):
    """The connection broke before an answer."""


class SSLError(S3TransportError):
    """The TLS handshake failed (certificate, protocol)."""


class BadResponseError(S3TransportError):
    """The server answered something that is not S3: a bad status line or header, a body over its cap,
    XML that does not parse."""


class _DeadlineSocket:
    """Socket methods that wait at most ``op_timeout`` for one read or write, and never past ``deadline``
    (a ``time.monotonic()`` value, None for none): http.client reads and writes through them."""

    deadline: float | None = None
    op_timeout: float | None = None

    def _arm(self, whole: bool = False) -> None:
        """Set the wait of the next read or write; ``whole``: a ``sendall``, whose wait is for all of it."""
        wait = None if whole else self.op_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _DeadlinePassed("the call's deadline passed")
            wait = left if wait is None else min(wait, left)
        self.settimeout(wait)

    def recv_into(self, *args, **kw):
        self._arm()
        return super().recv_into(*args, **kw)

    def recv(self, *args, **kw):
        self._arm()
        return super().recv(*args, **kw)

    def send(self, *args, **kw):
        self._arm()
        return super().send(*args, **kw)

    def sendall(self, *args, **kw):
        self._arm(whole=True)
        return super().sendall(*args, **kw)


class _DeadlinePassed(TimeoutError):
    """A read or write was due after the call's deadline."""


class _PlainSocket(_DeadlineSocket, socket.socket):
    pass


class _TlsSocket(_DeadlineSocket, ssl.SSLSocket):
    pass


def _connect(address, timeout, source_address=None) -> socket.socket:
    """``socket.create_connection``, as a socket whose reads and writes keep a deadline."""
    sock = socket.create_connection(address, timeout, source_address)
    timed = _PlainSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    timed.settimeout(timeout)  # the TLS handshake, if any, waits this long at most
    return timed


class Pool:
    """Idle keep-alive connections to one endpoint, shared by threads (each request holds its own)."""

    def __init__(self, scheme: str, host: str, port: int | None, timeout: float, maxsize: int,
                 cafile: str | None = None) -> None:
        self.scheme, self.host, self.port, self.timeout, self.maxsize = scheme, host, port, timeout, maxsize
        self._ctx = None
        if scheme == "https":
            # A private CA (an on-premises S3), as boto3 reads it; else the given bundle, else the system's.
            bundle = os.environ.get("AWS_CA_BUNDLE") or cafile
            try:
                self._ctx = ssl.create_default_context(cafile=bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"CA bundle {bundle!r}: cannot load it ({exc.__class__.__name__}); point AWS_CA_BUNDLE "
                                  "at a PEM file of CA certificates, or unset it") from None
            self._ctx.sslsocket_class = _TlsSocket
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._lock = threading.Lock()

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, whether it was used before)."""
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn, since = self._idle.pop()
                if now - since < IDLE_S:
                    return conn, True
                conn.close()
        if self._ctx is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self._ctx)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn._create_connection = _connect  # http.client's own hook for making the socket
        return conn, False

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.maxsize:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()


class StreamingBody:
    """An object's body, read as it arrives; the connection goes back to the pool once it is all read.

    A body that ends before its ``Content-Length`` raises :class:`ConnectionClosedError` (http.client
    would hand back the short read as if it were the end). Each read has its own deadline, from when
    it is asked for: ``deadline_s`` plus what it asks for (``amt``, or the rest of the body) at
    ``MIN_BODY_RATE``; a read still arriving then raises :class:`ReadTimeoutError`. A reader that
    paces itself (a download under a rate cap) is never cut off for the time between its reads.
    """

    def __init__(self, pool: Pool, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 where: str, deadline_s: float) -> None:
        self._pool, self._conn, self._resp, self._where = pool, conn, resp, where
        self._sock, self._deadline_s = resp.deadline_socket, deadline_s
        self._expected, self._got = resp.length, 0  # None when chunked: http.client checks those itself

    def read(self, amt: int | None = None) -> bytes:
        if self._conn is None:
            return b""
        left = None if self._expected is None else self._expected - self._got
        asked = (left or 0) if amt is None else amt if left is None else min(amt, left)
        self._sock.deadline = time.monotonic() + self._deadline_s + asked / MIN_BODY_RATE
        try:
            data = self._resp.read() if amt is None else self._resp.read(amt)
        except http.client.IncompleteRead as exc:
            self.close()
            raise ConnectionClosedError(f"{self._where}: the body broke off after {self._got + len(exc.partial)} "
                                        f"of {self._expected} bytes") from None
        except TimeoutError:
            self.close()
            raise ReadTimeoutError(f"{self._where}: the body was still arriving at the deadline of a read "
                                   f"({self._got} of {self._expected} bytes read)") from None
        except (http.client.HTTPException, OSError, ValueError) as exc:
            self.close()
            raise ConnectionClosedError(f"{self._where}: the body broke off ({type(exc).__name__})") from None
        self._got += len(data)
        if self._expected is not None and self._got < self._expected and (amt is None or len(data) < amt):
            # http.client reads until ``amt`` bytes or the end of the stream: a short read is the end.
            self.close()
            raise ConnectionClosedError(f"{self._where}: the body broke off after {self._got} of "
                                        f"{self._expected} bytes")
        if self._resp.isclosed():
            self._release()
        return data

    def iter_chunks(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        try:
            while chunk := self.read(chunk_size):
                yield chunk
        finally:
            self.close()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if self._resp.will_close:
            conn.close()
        else:
            self._pool.put(conn)

    def close(self) -> None:
        """Stop reading: the connection, with unread bytes in it, is closed rather than reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def deadline_for(deadline_s: float, body: bytes | None) -> float:
    """The deadline of a call sending ``body``: ``deadline_s`` from now, plus the body at ``MIN_BODY_RATE``."""
    return time.monotonic() + deadline_s + len(body or b"") / MIN_BODY_RATE


class Transport:
    """Pooled connections to one S3 endpoint, and the bounded reading of their answers.

    Args:
        endpoint_url: ``http(s)://host[:port][/path]``.
        timeout_s: connect timeout, and the longest wait for any one read or write.
        deadline_s: the most one call may take (see the module docstring); None: 3 x ``timeout_s``.
        max_pool_connections: idle connections kept for reuse.
        cafile: the CA certificates HTTPS verifies against when ``AWS_CA_BUNDLE`` is unset; None: the system's.
    """

    def __init__(self, endpoint_url: str, *, timeout_s: float = 10.0, deadline_s: float | None = None,
                 max_pool_connections: int = 64, cafile: str | None = None) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"S3 endpoint {endpoint_url!r}: expected http(s)://host[:port]")
        default_port = 443 if parts.scheme == "https" else 80
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"S3 endpoint {endpoint_url!r}: the port is not a number") from None
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        self.scheme, self.hostname, self.port = parts.scheme, parts.hostname, port or default_port
        self.host_header = host if port in (None, default_port) else f"{host}:{port}"
        self.base = parts.path.rstrip("/")
        self.timeout = float(timeout_s)
        self.deadline_s = float(deadline_s) if deadline_s is not None else 3 * self.timeout
        self.pool = Pool(parts.scheme, parts.hostname, port, self.timeout, max_pool_connections, cafile)

    def exchange(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                 deadline: float) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request (``url``: path and query) and read the answer's status line and headers.

        A pooled connection the server closed while idle is replaced at once (the request was never
        sent). Raises an :class:`S3TransportError`.
        """
        while True:
            conn, reused = self.pool.get()
            try:
                return conn, self._send(conn, method, url, body, headers, deadline)
            except S3TransportError as exc:
                conn.close()
                if reused and isinstance(exc, ConnectionClosedError):
                    continue
                raise

    def _send(self, conn: http.client.HTTPConnection, method: str, url: str, body: bytes | None,
              headers: dict[str, str], deadline: float) -> http.client.HTTPResponse:
        where = self.host_header
        if conn.sock is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeoutError(f"{where}: no answer within the deadline of {self.deadline_s:g} s")
            conn.timeout = min(self.timeout, left)
            try:
                conn.connect()
            except ssl.SSLError as exc:
                raise SSLError(f"{where}: {exc}") from None
            except TimeoutError:
                raise ConnectTimeoutError(f"{where}: no connection within {conn.timeout:g} s") from None
            except OSError as exc:
                raise EndpointConnectionError(f"{where}: {exc}") from None
        sock = conn.sock
        sock.deadline, sock.op_timeout = deadline, self.timeout
        try:
            conn.request(method, url, body=body, headers=headers)
            resp = conn.getresponse()
            resp.deadline_socket = sock  # the connection lets go of it when the answer closes it
            return resp
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise ReadTimeoutError(f"{where}: no whole answer within the deadline of {self.deadline_s:g} s") \
                    from None
            raise ReadTimeoutError(f"{where}: no answer within {self.timeout:g} s") from None
        except http.client.RemoteDisconnected as exc:
            raise ConnectionClosedError(f"{where}: {type(exc).__name__}") from None
        except (http.client.HTTPException, ValueError) as exc:  # a bad status line or header, too many headers
            raise BadResponseError(f"{where}: not an HTTP answer ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:80]})") from None
        except OSError as exc:
            raise ConnectionClosedError(f"{where}: {type(exc).__name__}") from None

    def body(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> "StreamingBody":
        """The answer's body, to read as it arrives (each read under its own deadline)."""
        return StreamingBody(self.pool, conn, resp, self.host_header, self.deadline_s)

    def content_length(self, hdrs: dict[str, str]) -> int | None:
        """The answer's Content-Length (header names lower-case); :class:`BadResponseError` if it is not a number."""
        length = hdrs.get("content-length")
        if length is not None and not (length.strip().isdigit() and length.strip().isascii()):
            raise BadResponseError(f"{self.host_header}: Content-Length {length[:40]!r} is not a number")
        return int(length) if length is not None else None

    def finish(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                cap: int = MAX_SMALL_BODY) -> bytes:
        """Read the (small) rest of a response, at most ``cap`` bytes, and give the connection back, or
        close it (a longer answer is cut there: the connection is not reused)."""
        try:
            data = resp.read(cap)
        except TimeoutError:
            conn.close()
            raise ReadTimeoutError(f"{self.host_header}: the answer was still arriving at the deadline") from None
        except (http.client.HTTPException, OSError, ValueError) as exc:
            conn.close()
            raise ConnectionClosedError(f"{self.host_header}: the answer broke off ({type(exc).__name__})") from None
        if resp.isclosed() and not resp.will_close:
            self.pool.put(conn)
        else:
            conn.close()
        return data

    def read_listing(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> dict[str, Any]:
        """Parse a ListObjectsV2 page as it arrives: at most MAX_LIST_PAGE_BYTES and MAX_LIST_PAGE_KEYS."""
        where = self.host_header
        parser = ET.XMLPullParser(events=("end",))
        contents: list[dict[str, Any]] = []
        fields: dict[str, str] = {}
        got = 0
        try:
            while chunk := resp.read(1 << 16):
                got += len(chunk)
                if got > MAX_LIST_PAGE_BYTES:
                    raise BadResponseError(f"{where}: a listing page over {MAX_LIST_PAGE_BYTES} bytes")
                parser.feed(chunk)
                for _, el in parser.read_events():
                    tag = el.tag.rsplit("}", 1)[-1]
                    if tag == "Contents":
                        if len(contents) >= MAX_LIST_PAGE_KEYS:
                            raise BadResponseError(f"{where}: a listing page of over {MAX_LIST_PAGE_KEYS} keys")
                        contents.append(self._listed(el))
                        el.clear()
                    elif tag in ("EncodingType", "IsTruncated", "NextContinuationToken"):
                        fields[tag] = (el.text or "").strip()
            parser.close()
        except ET.ParseError as exc:
            conn.close()
            raise BadResponseError(f"{where}: the listing is not S3's XML ({exc})") from None
        except TimeoutError:
            conn.close()
            raise ReadTimeoutError(f"{where}: the listing was still arriving at the deadline") from None
        except (http.client.HTTPException, OSError) as exc:
            conn.close()
            raise ConnectionClosedError(f"{where}: the listing broke off ({type(exc).__name__})") from None
        except BadResponseError:
            conn.close()
            raise
        if resp.isclosed() and not resp.will_close:
            self.pool.put(conn)
        else:
            conn.close()
        if fields.get("EncodingType", "").lower() == "url":
            for c in contents:
                c["Key"] = unquote_plus(c["Key"])
        out: dict[str, Any] = {"Contents": contents, "KeyCount": len(contents),
                               "IsTruncated": fields.get("IsTruncated", "").lower() == "true"}
        if fields.get("NextContinuationToken"):
            out["NextContinuationToken"] = fields["NextContinuationToken"]
        return out

    def _listed(self, el: ET.Element) -> dict[str, Any]:
        """One ``<Contents>`` entry of a listing (its key still URL-encoded)."""
        item = {child.tag.rsplit("}", 1)[-1]: (child.text or "") for child in el}
        size, modified = item.get("Size", "0").strip() or "0", item.get("LastModified", "")
        if not (size.isdigit() and size.isascii()):
            raise BadResponseError(f"{self.host_header}: a listed Size {size[:40]!r} is not a number")
        try:
            when = dt.datetime.fromisoformat(modified.replace("Z", "+00:00")) if modified else None
        except ValueError:
            when = None
        return {"Key": item.get("Key", ""), "Size": int(size), "ETag": item.get("ETag"), "LastModified": when}
