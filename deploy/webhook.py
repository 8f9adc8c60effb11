"""Record rollout requests from MLflow registry webhooks (``model_version_alias.created``).

``edgeslim fleet webhook FLEET --model NAME --alias edge-candidate`` listens for MLflow's
webhook POSTs, checks their HMAC signature (``X-MLflow-Signature: v1,<b64>`` over
``<delivery id>.<timestamp>.<body>``) with the secret in ``$EDGESLIM_WEBHOOK_SECRET``, refuses
stale timestamps and replayed delivery ids, ignores every model it does not follow, and for an
event it acts on only *records a request* in the fleet store
(:func:`edgeslim.deploy.requests.record_request`). It holds no signing key and needs no
MLflow: the controller Job (``edgeslim fleet reconcile FLEET --follow NAME``) re-checks the
request, re-resolves the alias in MLflow and signs. Register it with
``MlflowClient().create_webhook(name, url, events=["model_version_alias.created"], secret=...)``.

Everything before the HMAC check is hostile, so the server is built to stay up under it:

- one thread reads every connection (``selectors``, non-blocking sockets); a stalled or slow
  client costs a socket and at most 16 KiB of headers, never a thread, and is closed (408)
  ``read_timeout`` seconds after it connected, however it trickles bytes;
- at most ``max_connections`` are open at once. One more sheds a connection to make room: one
  already answered and draining if there is one, else the oldest with no bytes waiting unread, which
  has had longest to send its request (a delivery sends its whole request at once, in milliseconds; a
  client that holds a connection open with a trickle of bytes is what is shed), so stalled clients never keep a signed
  delivery out. The bodies being read share a budget of ``8 x MAX_WEBHOOK_BYTES`` (503 beyond);
- ``Content-Length`` over ``bounded.MAX_WEBHOOK_BYTES`` is answered 413 before the body is
  read (the rest is discarded, up to a cap, so the client sees the answer); no
  ``Content-Length`` is 411;
- complete requests go to a fixed pool of ``workers`` threads through a bounded queue (503
  when full); only they check signatures, parse JSON (``bounded.loads``) and write the store.

MLflow retries 429/5xx with the same delivery id: a delivery that could not be recorded is
answered 503 and forgotten by the replay cache, so its retry is recorded.

With ``tls`` (:class:`~edgeslim.deploy.webhook_tls.TlsFiles`) it serves HTTPS: each accepted
socket is wrapped and its handshake runs on the reading thread, non-blocking, inside the same
``read_timeout``; MLflow's server accepts https URLs by default (``deploy/webhook_tls.py``).

Other receivers reuse this server: ``edgeslim trigger`` (``deploy/trigger.py``) subclasses it,
overriding :meth:`WebhookServer.handle_event` (any 5xx it answers is forgotten by the replay cache
too), and gives it ``routes``: GET paths such as ``/healthz`` and ``/readyz`` answered by the
workers (no body; any other GET is 404). Without routes every GET is 405, as before.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import http
import logging
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from typing import Callable

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy import bounded
from edgeslim.deploy.store import check_name

log = logging.getLogger("edgeslim.webhook")
MAX_SKEW_S = 300
MAX_HEADER_BYTES = 16 << 10
MAX_HEADERS = 100
DRAIN_S = 2.0           # after an early answer, discard what the client still sends for this long...
DRAIN_BYTES = 16 << 20  # ...or up to this much, then close
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_DIGITS = re.compile(r"^[0-9]{1,19}$")


def verify_signature(secret: str, delivery_id: str, timestamp: str, body: bytes, header: str,
                     now: float | None = None) -> bool:
    """True if ``header`` is MLflow's v1 HMAC-SHA256 of this delivery and not stale."""
    try:
        if abs((now or time.time()) - int(timestamp)) > MAX_SKEW_S:
            return False
    except (TypeError, ValueError):
        return False
    version, _, sig = (header or "").partition(",")
    if version != "v1" or not sig:
        return False
    want = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    try:
        return hmac.compare_digest(want, base64.b64decode(sig))
    except ValueError:
        return False


def _printable(text: str, cap: int = 128) -> str:
    """Hostile text for one log line: no newlines or control characters, bounded."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:cap])


class ReplayCache:
    """Delivery ids seen recently, kept ``keep_s`` (2 x MAX_SKEW_S: a timestamp up to MAX_SKEW_S
    in the future stays valid that long after it arrives), at most ``capacity`` of them.

    ``reserve`` answers ``new`` (now pending), ``pending`` (being handled), ``done`` (a replay)
    or ``full``: an entry is never evicted before it expires, since that would open a replay.
    """

    def __init__(self, capacity: int = 10000, keep_s: float = 2 * MAX_SKEW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity, self.keep_s, self.clock = capacity, keep_s, clock
        self._seen: collections.OrderedDict[str, list] = collections.OrderedDict()  # id -> [expires, state]
        self._lock = threading.Lock()

    def reserve(self, delivery_id: str) -> str:
        with self._lock:
            now = self.clock()
            while self._seen:
                first = next(iter(self._seen.values()))
                if first[0] > now:
                    break
                self._seen.popitem(last=False)
            got = self._seen.get(delivery_id)
            if got is not None:
                return got[1]
            if len(self._seen) >= self.capacity:
                return "full"
            self._seen[delivery_id] = [now + self.keep_s, "pending"]
            return "new"

    def finish(self, delivery_id: str) -> None:
        with self._lock:
            if delivery_id in self._seen:
                self._seen[delivery_id][1] = "done"

    def release(self, delivery_id: str) -> None:
        with self._lock:
            self._seen.pop(delivery_id, None)

    def __len__(self) -> int:
        return len(self._seen)


def _response(status: int, text: str = "", extra: dict[str, str] | None = None) -> bytes:
    phrase = http.HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    body = b"" if status in (204, 304) or status < 200 else (text + "\n").encode()
    if status not in (204, 304):
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Refused(Exception):
    def __init__(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.extra = status, text, extra


class _Conn:
    __slots__ = ("sock", "peer", "buf", "state", "deadline", "need", "method", "path", "headers", "budget",
                 "drained")

    def __init__(self, sock: socket.socket, peer: str, deadline: float, *, tls: bool = False) -> None:
        self.sock, self.peer, self.deadline = sock, peer, deadline
        self.buf = bytearray()
        self.state = "handshake" if tls else "head"  # [handshake ->] head -> body -> (to a worker) | drain
        self.need = self.budget = self.drained = 0
        self.method = self.path = ""
        self.headers: dict[str, str] = {}


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[2].startswith(b"HTTP/1."):
        raise _Refused(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise _Refused(431, f"more than {MAX_HEADERS} header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise _Refused(400, "malformed header line")
        key, val = name.decode("ascii").lower(), value.strip().decode("latin-1")
        if key in headers and key in ("content-length", "transfer-encoding"):
            if headers[key] != val:
                raise _Refused(400, f"conflicting {key} headers")
        headers[key] = val
    return parts[0].decode("ascii"), parts[1].decode("latin-1"), headers


class WebhookServer:
    """The receiver; see the module docstring. ``serve_forever`` in one thread, ``shutdown`` from another.

    Args:
        on_request: ``on_request(model, version, alias, delivery_id) -> bool`` records a
            request (False: this delivery id was already recorded). Raising makes the answer
            503, so MLflow retries; a ``ConfigError`` (a field it refuses) makes it 400. Only
            :meth:`handle_event` uses it: a subclass that overrides that may leave it out.
        routes: GET path -> ``route() -> (status, text)``, run by a worker (``/healthz``,
            ``/readyz``); None: every GET is 405.
        tls: serve HTTPS with this certificate and key (a ``TlsFiles``); None: plain HTTP.
    """

    def __init__(self, host: str, port: int, secret: str, alias: str, *, models: list[str],
                 on_request: Callable[[str, str, str, str], bool] | None = None, read_timeout: float = 10.0,
                 workers: int = 16, max_connections: int = 256, queue_size: int = 64,
                 replay: ReplayCache | None = None,
                 routes: dict[str, Callable[[], tuple[int, str]]] | None = None, tls=None) -> None:
        if not secret:
            raise ConfigError("the webhook needs the secret given to MLflow's create_webhook")
        if not models:
            raise ConfigError("the webhook needs the models this fleet follows (--model NAME)")
        if read_timeout <= 0 or workers < 1 or max_connections < 1 or queue_size < 1:
            raise ConfigError("read_timeout, workers, max_connections and queue_size must be positive")
        if on_request is None and type(self).handle_event is WebhookServer.handle_event:
            raise ConfigError("the webhook needs on_request, or a subclass with its own handle_event")
        self.secret, self.alias, self.models = secret, alias, frozenset(models)
        self.routes = dict(routes or {})
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.on_request, self.read_timeout = on_request, float(read_timeout)
        self.workers, self.max_connections = int(workers), int(max_connections)
        self.replay = replay or ReplayCache()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listen = socket.create_server((host, port), family=family, backlog=128)
        self._listen.setblocking(False)
        self.server_address = self._listen.getsockname()[:2]
        self.server_port = self.server_address[1]
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._budget = 8 * bounded.MAX_WEBHOOK_BYTES
        self._budget_lock = threading.Lock()
        self._conns: dict[socket.socket, _Conn] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def serve_forever(self, poll_interval: float = 0.25) -> None:
        self._stopped.clear()
        if not self._threads:
            self._threads = [threading.Thread(target=self._work, name=f"webhook-worker-{i}", daemon=True)
                             for i in range(self.workers)]
            for t in self._threads:
                t.start()
        sel = selectors.DefaultSelector()
        sel.register(self._listen, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._sel = sel
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=poll_interval):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        self._on_readable(key.data)
                self._expire()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait for it (as ``socketserver`` does)."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stopped.wait(30)
        for _ in self._threads:
            try:
                self._jobs.put(None, timeout=1)
            except queue.Full:
                break

    def server_close(self) -> None:
        for s in (self._listen, self._wake_r, self._wake_w):
            s.close()

    # ------------------------------------------------------------------ the reading thread
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self._listen.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors and the like: do not spin on it
                log.error("accept failed: %s", exc)
                time.sleep(0.05)
                return
            sock.setblocking(False)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if len(self._conns) >= self.max_connections:
                self._shed()
            if self.tls is not None:
                try:
                    sock = self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError) as exc:
                    log.info("%s: TLS refused: %s", peer, exc)
                    sock.close()
                    continue
            conn = _Conn(sock, peer, time.monotonic() + self.read_timeout, tls=self.tls is not None)
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _shed(self) -> None:
        """Close one connection to make room for a new one: a draining one (already answered), else the
        oldest (dict order is accept order) with nothing waiting to be read, answered 408 as a timed-out
        request is. A connection whose bytes have arrived but are not read yet (a delivery accepted in the
        same burst as the slow clients' reconnections) is making progress, so it is passed over."""
        conns = list(self._conns.values())
        conn = next((c for c in conns if c.state == "drain"), None) \
            or next((c for c in conns if not self._has_unread(c)), None) or conns[0]
        if conn.state not in ("drain", "handshake"):
            waited = self.read_timeout - (conn.deadline - time.monotonic())
            log.info("%s shed after %.1fs without a whole request: %d connections open, the most allowed (408)",
                     conn.peer, waited, len(self._conns))
            self._send_now(conn.sock, _response(408, "request not received in time; other clients are waiting"))
        self._close(conn)

    @staticmethod
    def _has_unread(conn: _Conn) -> bool:
        """Bytes have arrived on ``conn`` that the server has not read (plain TCP; a TLS connection's
        records cannot be peeked, so it counts as having none)."""
        if isinstance(conn.sock, ssl.SSLSocket):
            return False
        try:
            return bool(conn.sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # reset or closed: nothing it waits to say
            return False

    @staticmethod
    def _send_now(sock: socket.socket, data: bytes) -> None:
        """A short answer on a non-blocking socket: it fits the send buffer, or is dropped."""
        try:
            sock.send(data)
        except OSError:
            pass

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is not None:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._give_back(conn)
        conn.buf = bytearray()
        conn.sock.close()

    def _give_back(self, conn: _Conn) -> None:
        if conn.budget:
            with self._budget_lock:
                self._budget += conn.budget
            conn.budget = 0

    def _refuse(self, conn: _Conn, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        """Answer before the request is read, then discard what the client still sends (so it
        sees the answer rather than a reset), for DRAIN_S or DRAIN_BYTES at most."""
        log.info("%s %s %s -> %d %s", conn.peer, _printable(conn.method or "-", 16), _printable(conn.path or "-"),
                 status, text)
        self._give_back(conn)
        conn.buf = bytearray()
        self._send_now(conn.sock, _response(status, text, extra))
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.state, conn.deadline = "drain", time.monotonic() + min(DRAIN_S, self.read_timeout)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            if conn.state not in ("drain", "handshake"):
                log.info("%s timed out after %gs reading the request (408)", conn.peer, self.read_timeout)
                self._send_now(conn.sock, _response(408, "request not received in time"))
            self._close(conn)

    def _on_readable(self, conn: _Conn) -> None:
        # A TLS socket may hold decrypted bytes the selector does not see: read them too.
        while self._read_once(conn) and conn.sock in self._conns and conn.state != "drain" \
                and isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            pass

    def _handshake(self, conn: _Conn) -> bool:
        """One non-blocking step of the TLS handshake; True once it is done."""
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            return False
        except ssl.SSLWantWriteError:
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            return False
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a bad client, a plain-HTTP request
            log.info("%s: TLS handshake failed: %s", conn.peer, _printable(getattr(exc, "reason", None) or exc, 200))
            self._close(conn)
            return False
        self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        conn.state = "head"
        return True

    def _read_once(self, conn: _Conn) -> bool:
        """Read what the socket has and act on it; False when nothing was read."""
        if conn.state == "handshake" and not self._handshake(conn):
            return False
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError:
            self._close(conn)
            return False
        if not data:
            self._close(conn)
            return False
        if conn.state == "drain":
            conn.drained += len(data)
            if conn.drained > DRAIN_BYTES:
                self._close(conn)
            return True
        try:
            if conn.state == "head":
                start = max(0, len(conn.buf) - 3)
                conn.buf += data
                end = conn.buf.find(b"\r\n\r\n", start)
                if end < 0 or end > MAX_HEADER_BYTES:
                    if len(conn.buf) > MAX_HEADER_BYTES:
                        raise _Refused(431, f"request headers over {MAX_HEADER_BYTES} bytes")
                    return True
                self._begin_body(conn, bytes(conn.buf[:end]), conn.buf[end + 4:])
            else:
                conn.buf += data
            if len(conn.buf) >= conn.need:
                self._dispatch(conn)
        except _Refused as r:
            self._refuse(conn, r.status, r.text, r.extra)
        return True

    def _begin_body(self, conn: _Conn, head: bytes, rest: bytearray) -> None:
        conn.method, conn.path, conn.headers = _parse_head(head)
        if conn.method == "GET" and self.routes:
            if conn.path.split("?", 1)[0] not in self.routes:
                raise _Refused(404, f"no such route; GET {', '.join(sorted(self.routes))}, or POST an event")
            if "transfer-encoding" in conn.headers or conn.headers.get("content-length", "0") != "0":
                raise _Refused(400, "a GET has no body")
            conn.need, conn.state, conn.buf = 0, "body", bytearray()  # complete: to a worker
            return
        if conn.method != "POST":
            if self.routes:
                raise _Refused(405, "only GET (" + ", ".join(sorted(self.routes)) + ") and POST",
                               {"Allow": "GET, POST"})
            raise _Refused(405, "only POST", {"Allow": "POST"})
        if "transfer-encoding" in conn.headers:
            if "content-length" in conn.headers:
                raise _Refused(400, "both Content-Length and Transfer-Encoding")
            raise _Refused(411, "Content-Length required (no chunked bodies)")
        length = conn.headers.get("content-length")
        if length is None:
            raise _Refused(411, "Content-Length required")
        if not _DIGITS.match(length):
            raise _Refused(400, "Content-Length is not a number")
        need = int(length)
        if need > bounded.MAX_WEBHOOK_BYTES:
            raise _Refused(413, f"body of {need} bytes is over the cap of {bounded.MAX_WEBHOOK_BYTES}")
        with self._budget_lock:
            if need > self._budget:
                raise _Refused(503, "busy reading other bodies; retry", {"Retry-After": "1"})
            self._budget -= need
        conn.budget, conn.need, conn.state = need, need, "body"
        conn.buf = bytearray(rest)
        if conn.headers.get("expect", "").lower() == "100-continue" and len(conn.buf) < need:
            self._send_now(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _dispatch(self, conn: _Conn) -> None:
        body = bytes(conn.buf[:conn.need])
        conn.buf = bytearray()
        if self._jobs.full():  # only this thread puts: a queue not full now takes the job below
            raise _Refused(503, "busy; retry", {"Retry-After": "2"})
        # The worker owns the socket from here: let go of it before the worker may close it.
        self._conns.pop(conn.sock, None)
        self._sel.unregister(conn.sock)
        self._jobs.put_nowait((conn, body))

    # ------------------------------------------------------------------ the workers
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, body = job
            try:
                if conn.method == "GET":
                    status, text = self.routes[conn.path.split("?", 1)[0]]()
                    extra = None
                else:
                    status, text, extra = self.decide(conn.headers, body)
            except Exception:  # a bug must not take the worker down
                log.exception("%s: unexpected error", conn.peer)
                status, text, extra = 500, "internal error", None
            finally:
                self._give_back(conn)
            # Probes come every few seconds: their answers are logged only at DEBUG.
            log.log(logging.DEBUG if conn.method == "GET" else logging.INFO, "%s %s %s -> %d %s", conn.peer,
                    conn.method, _printable(conn.path), status, text)
            try:
                conn.sock.settimeout(self.read_timeout)
                conn.sock.sendall(_response(status, text, extra))
            except OSError:
                pass
            finally:
                conn.sock.close()

    def decide(self, headers: dict[str, str], body: bytes) -> tuple[int, str, dict[str, str] | None]:
        """The answer to one complete request: ``(status, text, extra headers)``."""
        delivery = headers.get("x-mlflow-delivery-id", "")
        if not verify_signature(self.secret, delivery, headers.get("x-mlflow-timestamp", ""), body,
                                headers.get("x-mlflow-signature", "")):
            return 401, "bad or stale signature", None
        try:
            check_name("delivery", delivery)
        except ConfigError:
            return 400, "X-MLflow-Delivery-Id is not a plain id", None
        seen = self.replay.reserve(delivery)
        if seen == "done":
            log.info("delivery %s: duplicate delivery ignored", delivery)
            return 200, "duplicate delivery ignored", None
        if seen == "pending":
            return 503, "this delivery is being handled; retry", {"Retry-After": "2"}
        if seen == "full":
            log.error("replay cache full (%d recent deliveries): answering 503", len(self.replay))
            return 503, "too many recent deliveries; retry", {"Retry-After": "30"}
        keep = False
        try:
            status, text, extra = self._act(delivery, body)
            keep = status < 500  # MLflow retries a 5xx with this delivery id: let the retry through
            return status, text, extra
        except Exception as exc:  # the store is down, or a bug: MLflow retries 503 with this delivery id
            log.error("delivery %s: could not record the request: %s", delivery, _printable(str(exc), 300))
            return 503, "could not record the request; retry", {"Retry-After": "5"}
        finally:
            (self.replay.finish if keep else self.replay.release)(delivery)

    def _act(self, delivery: str, body: bytes) -> tuple[int, str, dict[str, str] | None]:
        try:
            event = bounded.loads(body, what="webhook body", max_bytes=bounded.MAX_WEBHOOK_BYTES)
        except bounded.BoundedInputError as exc:
            return 400, exc.reason, None
        if not isinstance(event, dict):
            return 400, "not a JSON object", None
        return self.handle_event(delivery, event)

    def handle_event(self, delivery: str, event: dict) -> tuple[int, str, dict[str, str] | None]:
        """The answer to a signed, first-seen event (a JSON object): here, an alias move of a
        followed model records a request through ``on_request``. Subclasses override it."""
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if (event.get("entity"), event.get("action")) != ("model_version_alias", "created") \
                or data.get("alias") != self.alias:
            return 204, "not an event this receiver acts on", None
        name, version = data.get("name"), data.get("version")
        if not isinstance(name, str) or isinstance(version, bool) or not isinstance(version, (str, int)):
            return 400, "data.name or data.version missing", None
        if name not in self.models:
            log.warning("ignored: model %s is not followed by this fleet", _printable(name))
            return 204, "model not followed", None
        try:
            recorded = self.on_request(name, str(version), self.alias, delivery)
        except ConfigError as exc:
            return 400, _printable(str(exc), 200), None
        if not recorded:
            log.info("delivery %s: duplicate delivery ignored (already recorded)", delivery)
            return 200, "duplicate delivery ignored", None
        log.info("delivery %s: recorded a request for %s v%s@%s", delivery, _printable(name),
                 _printable(str(version), 64), self.alias)
        return 202, "request recorded", None


def make_server(host: str, port: int, secret: str, alias: str, *, models: list[str],
                on_request: Callable[[str, str, str, str], bool], read_timeout: float = 10.0,
                workers: int = 16, max_connections: int = 256, tls=None) -> WebhookServer:
    """A receiver that calls ``on_request(model, version, alias, delivery_id)`` for matching,
    signed, first-seen events of a model in ``models``; see :class:`WebhookServer`."""
    return WebhookServer(host, port, secret, alias, models=models, on_request=on_request,
                         read_timeout=read_timeout, workers=workers, max_connections=max_connections, tls=tls)
