"""Slow-loris against a webhook receiver: many connections that never finish their request, while
signed deliveries try to get through. Used by tests/security/test_webhook_slowloris.py, and run on
its own to compare two versions of the receiver in one run:

    python -m tests.slowloris --old main        # deploy/webhook.py at git revision "main" beside this tree's

:class:`SlowLoris` keeps ``n`` connections open, each having sent part of a request's headers, and
opens a new one for each the receiver closes (as an attacker would). :func:`deliveries` sends signed
deliveries one after another and returns each one's status and seconds.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import selectors
import logging
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tests.fleet_it_helpers import mlflow_signed_headers

REPO = Path(__file__).resolve().parents[1]
PARTIAL = b"POST / HTTP/1.1\r\nHost: receiver\r\nContent-Le"  # ...and never another byte


class SlowLoris:
    """``n`` stalled connections to 127.0.0.1:``port``, kept at ``n`` until :meth:`stop`. Each sends
    ``payload`` and nothing more (``b""`` against HTTPS: a handshake that never starts)."""

    def __init__(self, port: int, n: int = 256, payload: bytes = PARTIAL) -> None:
        self.port, self.n, self.payload = port, n, payload
        self.sel = selectors.DefaultSelector()
        self.opened = self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if self.payload:
            s.sendall(self.payload)
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ)
        self.opened += 1

    def start(self) -> "SlowLoris":
        for _ in range(self.n):
            self._open()
        self._thread = threading.Thread(target=self._keep, daemon=True)
        self._thread.start()
        return self

    def _keep(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.sel.select(timeout=0.05):
                s = key.fileobj
                try:
                    if s.recv(4096):
                        continue  # an answer (408): the close follows
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.sel.unregister(s)
                s.close()
                self.closed_by_server += 1
                if not self._stop.is_set():
                    try:
                        self._open()
                    except OSError:
                        pass

    @property
    def open_now(self) -> int:
        return len(self.sel.get_map())

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for key in list(self.sel.get_map().values()):
            self.sel.unregister(key.fileobj)
            key.fileobj.close()
        self.sel.close()


def alias_event(name: str = "m", version: str = "1") -> bytes:
    return json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"name": name, "alias": "edge-candidate", "version": version}}).encode()


def deliveries(port: int, secret: str, count: int, *, model: str = "m", timeout: float = 30.0,
               cafile: Path | None = None) -> list[tuple[int, float]]:
    """Send ``count`` signed deliveries in turn (HTTPS verified against ``cafile`` when given): (status,
    seconds) of each; status 0 when no answer came."""
    out = []
    for i in range(count):
        body = alias_event(model, str(i + 1))
        t = time.monotonic()
        if cafile is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                               context=ssl.create_default_context(cafile=str(cafile)))
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("POST", "/", body=body, headers=mlflow_signed_headers(secret, body))
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            status = 0
        finally:
            conn.close()
        out.append((status, time.monotonic() - t))
    return out


def summary(results: list[tuple[int, float]]) -> dict:
    accepted = [s for s, _ in results if 200 <= s < 300]
    ms = sorted(dt * 1000 for _, dt in results)
    return {"deliveries": len(results), "accepted": len(accepted),
            "statuses": {str(s): sum(1 for x, _ in results if x == s) for s in sorted({x for x, _ in results})},
            "median_ms": round(statistics.median(ms), 1), "max_ms": round(ms[-1], 1)}


def _receiver_module(revision: str | None):
    """deploy/webhook.py of this tree (None) or of a git revision, as a module."""
    if revision is None:
        from edgeslim.deploy import webhook

        return webhook
    source = subprocess.run(["git", "show", f"{revision}:deploy/webhook.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "webhook_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"webhook_at_{revision}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(module, *, stalled: int, count: int, read_timeout: float) -> dict:
    """One receiver of ``module`` in this process, ``stalled`` slow-loris connections, ``count`` deliveries."""
    secret = uuid.uuid4().hex
    server = module.make_server("127.0.0.1", 0, secret, "edge-candidate", models=["m"],
                                on_request=lambda *a: True, read_timeout=read_timeout)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    loris = SlowLoris(server.server_port, stalled).start()
    try:
        time.sleep(0.5)  # every stalled connection accepted
        out = summary(deliveries(server.server_port, secret, count))
        out["stalled_open_after"] = loris.open_now
    finally:
        loris.stop()
        server.shutdown()
        server.server_close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", default="main", help="git revision of the receiver to compare (default main)")
    p.add_argument("--stalled", type=int, default=256, help="slow-loris connections (default 256)")
    p.add_argument("--deliveries", type=int, default=20, help="signed deliveries sent in turn (default 20)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="the receivers' --read-timeout (default 10)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the receivers log each refusal; the figures are what counts here
    rows = {}
    for label, rev in ((f"old ({args.old})", args.old), ("new (this tree)", None)):
        rows[label] = run(_receiver_module(rev), stalled=args.stalled, count=args.deliveries,
                          read_timeout=args.read_timeout)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
