"""A misbehaving S3 endpoint on loopback, for tests and the bench: a threaded HTTP server that passes
requests to a real S3 server (RGW) and breaks the answers it is told to break.

    s3 = HostileS3(upstream="http://127.0.0.1:7480")      # or None: a small bucket in memory
    s3.fault("short", method="GET", path=r"/manifest\\.json$", times=1)
    ... point a client at s3.endpoint ...
    s3.close()

A fault applies to the requests that match its method and path (a regular expression searched in
the request's path and query), ``times`` times (None: until :meth:`clear`); the first matching
fault wins, anything else passes through. The modes:

- ``short``: the upstream answer's headers, then half its body, then the connection closes;
- ``truncate``: half the body, under a Content-Length that says so (a broken intermediary);
- ``trickle``: the answer one byte every ``interval`` seconds, for at most ``duration``;
  ``trickle-body``: the status line and headers at once, then the body so;
- ``huge-listing``: a ListObjectsV2 page of ``size`` bytes, made as it is sent (server memory stays small);
- ``endless-listing``: a page that says there is more, with the same continuation token every time;
- ``garbage-xml``: a 200 whose body is not XML; ``garbage-error``: a 500 whose body is not XML;
- ``bad-length``: ``Content-Length: abc``;
- ``bad-status``: a status line that is not HTTP;
- ``huge-headers``: a header line of 100 KB, then 500 headers;
- ``no-date``: the upstream answer without its Date and Last-Modified headers.

Without ``upstream``, requests pass to a bucket held in memory (PUT, GET, HEAD, DELETE and one page
of ListObjectsV2; no signature is checked), enough for the store's calls. ``requests`` records
(method, path) of everything received; the server never raises into a test.
"""

from __future__ import annotations

import dataclasses
import http.client
import hashlib
import re
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

MODES = ("short", "truncate", "trickle", "trickle-body", "huge-listing", "endless-listing", "garbage-xml",
         "garbage-error", "bad-length", "bad-status", "huge-headers", "no-date")


@dataclasses.dataclass
class Fault:
    mode: str
    method: str | None = None
    path: str | None = None
    times: int | None = None
    interval: float = 1.0
    duration: float = 120.0
    size: int = 300 << 20
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.times is None or self.hits < self.times) and (self.method in (None, method)) and \
            (self.path is None or re.search(self.path, path) is not None)


class HostileS3:
    """See the module docstring. ``upstream``: the real S3 endpoint requests pass through to."""

    def __init__(self, upstream: str | None = None, host: str = "127.0.0.1") -> None:
        self.upstream = urlsplit(upstream) if upstream else None
        self.faults: list[Fault] = []
        self.objects: dict[str, tuple[bytes, float]] = {}  # the in-memory bucket: path -> (data, written at)
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(_Handler):
            s3 = outer

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(self, mode: str, *, method: str | None = None, path: str | None = None, times: int | None = None,
              **kw) -> Fault:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        f = Fault(mode, method, path, times, **kw)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for f in self.faults:
                if f.matches(method, path):
                    f.hits += 1
                    return f
        return None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    s3: HostileS3
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: tests read their own logs
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (OSError, ValueError):
            self.close_connection = True

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.s3._take(self.command, self.path)
        if fault is None:
            status, reason, headers, data = self._upstream(body)
            self._write(status, reason, headers, data)
            return
        self.close_connection = True
        getattr(self, "_" + fault.mode.replace("-", "_"))(fault, body)

    do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = _any

    # -- passing through ------------------------------------------------------------------------------
    def _upstream(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        up = self.s3.upstream
        if up is None:
            return self._in_memory(body)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        try:
            # The client signed our address as its Host: it is sent on unchanged, as a TCP proxy would.
            conn.request(self.command, self.path, body=body if body else None,
                         headers={k: v for k, v in self.headers.items()})
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
            return resp.status, resp.reason, headers, data
        finally:
            conn.close()

    def _in_memory(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        path, _, query = self.path.partition("?")
        objects, date = self.s3.objects, ("Date", formatdate(usegmt=True))
        if "list-type=2" in query:
            bucket = path.rstrip("/") + "/"
            prefix = dict(kv.partition("=")[::2] for kv in query.split("&")).get("prefix", "")
            keys = sorted(k[len(bucket):] for k in objects if k.startswith(bucket + unquote(prefix)))
            xml = "".join(f"<Contents><Key>{escape(k)}</Key><Size>{len(objects[bucket + k][0])}</Size></Contents>"
                          for k in keys)
            return 200, "OK", [("Content-Type", "application/xml"), date], (
                f'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>false'
                f"</IsTruncated>{xml}</ListBucketResult>").encode()
        if self.command == "PUT":
            if path.count("/") >= 2:
                objects[path] = (body, time.time())
            return 200, "OK", [("ETag", f'"{hashlib.md5(body).hexdigest()}"'), date], b""
        if self.command == "DELETE":
            objects.pop(path, None)
            return 204, "No Content", [date], b""
        if path not in objects:
            return 404, "Not Found", [("Content-Type", "application/xml"), date], \
                b"<Error><Code>NoSuchKey</Code><Message>not here</Message></Error>"
        data, written = objects[path]
        headers = [("ETag", f'"{hashlib.md5(data).hexdigest()}"'), date,
                   ("Last-Modified", formatdate(written, usegmt=True))]
        if self.command == "HEAD":
            return 200, "OK", headers + [("Content-Length", str(len(data)))], b""
        return 200, "OK", headers, data

    def _write(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, *,
               length: int | None = None, send: int | None = None) -> None:
        head = [f"HTTP/1.1 {status} {reason}"]
        head += [f"{k}: {v}" for k, v in headers if k.lower() != "content-length"]
        if self.command != "HEAD" or any(k.lower() == "content-length" for k, _ in headers):
            given = [v for k, v in headers if k.lower() == "content-length"]
            n = length if length is not None else (int(given[0]) if given and self.command == "HEAD" else len(data))
            head.append(f"Content-Length: {n}")
        if self.close_connection:
            head.append("Connection: close")
        out = ("\r\n".join(head) + "\r\n\r\n").encode()
        if self.command != "HEAD":
            out += data if send is None else data[:send]
        self.wfile.write(out)
        self.wfile.flush()

    # -- the faults -----------------------------------------------------------------------------------
    def _short(self, fault: Fault, body: bytes) -> None:
        status, reason, headers, data = self._upstream(body)
        self._write(status, reason, headers, data, send=len(data) // 2)

    def _truncate(self, fault: Fault, body: bytes) -> None:
        status, reason, headers, data = self._upstream(body)
        self._write(status, reason, headers, data[:len(data) // 2])

    def _trickle(self, fault: Fault, body: bytes, *, headers_first: bool = False) -> None:
        status, reason, headers, data = self._upstream(body)
        head = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers if k.lower() != "content-length"]
        out = ("\r\n".join(head + [f"Content-Length: {len(data)}", "Connection: close"]) + "\r\n\r\n").encode()
        if headers_first:
            self.wfile.write(out)
            self.wfile.flush()
            out = b""
        out += data
        end = time.monotonic() + fault.duration
        for i in range(len(out)):
            if time.monotonic() > end:
                return
            try:
                self.wfile.write(out[i:i + 1])
                self.wfile.flush()
            except OSError:
                return  # the client gave up: what a deadline is for
            time.sleep(fault.interval)

    def _trickle_body(self, fault: Fault, body: bytes) -> None:
        self._trickle(fault, body, headers_first=True)

    def _huge_listing(self, fault: Fault, body: bytes) -> None:
        start = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
                 b'2006-03-01/"><Name>b</Name><IsTruncated>false</IsTruncated>')
        entry = b"<Contents><Key>k%09d</Key><Size>1</Size><ETag>&quot;x&quot;</ETag></Contents>"
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {fault.size}\r\n"
                "Connection: close\r\n\r\n").encode()
        try:
            self.wfile.write(head + start)
            sent, i = len(start), 0
            while sent < fault.size:
                chunk = b"".join(entry % (i + j) for j in range(1000))
                i += 1000
                chunk = chunk[:fault.size - sent]
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass

    def _endless_listing(self, fault: Fault, body: bytes) -> None:
        xml = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
               b'2006-03-01/"><Name>b</Name><IsTruncated>true</IsTruncated><NextContinuationToken>again'
               b'</NextContinuationToken><KeyCount>0</KeyCount></ListBucketResult>')
        self._write(200, "OK", [("Content-Type", "application/xml")], xml)

    def _garbage_xml(self, fault: Fault, body: bytes) -> None:
        self._write(200, "OK", [("Content-Type", "application/xml"), ("ETag", '"x"')],
                    b"<ListBucketResult><Contents><Key>a</Key><Size>zz</Si\x00ze>&&&" + b"\xff" * 64)

    def _garbage_error(self, fault: Fault, body: bytes) -> None:
        self._write(500, "Internal Server Error", [("Content-Type", "application/xml")], b"<Error><Code>&&&\xff")

    def _bad_length(self, fault: Fault, body: bytes) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\nETag: \"x\"\r\nConnection: close\r\n\r\nhello")
        self.wfile.flush()

    def _bad_status(self, fault: Fault, body: bytes) -> None:
        self.wfile.write(b"HTTP/1.1 two-hundred OK\r\nContent-Length: 0\r\n\r\n")
        self.wfile.flush()

    def _huge_headers(self, fault: Fault, body: bytes) -> None:
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (100 << 10) + b"\r\n")
            self.wfile.write(b"".join(b"X-Many-%d: b\r\n" % i for i in range(500)) + b"Content-Length: 0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass

    def _no_date(self, fault: Fault, body: bytes) -> None:
        status, reason, headers, data = self._upstream(body)
        keep = [(k, v) for k, v in headers if k.lower() not in ("date", "last-modified")]
        # BaseHTTPRequestHandler would add a Date of its own through send_response: written raw, it does not.
        self._write(status, reason, keep, data)
