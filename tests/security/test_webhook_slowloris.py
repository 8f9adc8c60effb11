"""Slow clients do not keep signed deliveries out of the webhook receiver.

In process first (a receiver of 8 connections, cheap): with 8 stalled connections open, signed
deliveries are answered 202 and the oldest stalled connection is shed with 408. (Eight, not more: with
more reconnecting stalled clients than the cap, every shed brings a reconnection that sheds another,
and a delivery in the same process as those clients and the receiver may not get the GIL to send its
request before it is the oldest of eight; the 256-connection runs below cover that churn.) Then a real
``edgeslim fleet webhook`` process (at most 256 connections, its default) held by 256 slow-loris
connections (tests/slowloris.py), each having sent part of its headers, reopened as soon as the
receiver closes one: signed deliveries are still recorded (202, never 503), and each shed connection
is one line in the log. The same over HTTPS, against connections whose TLS handshake never starts.
"""

from __future__ import annotations

import pytest

from tests.fleet_it_helpers import self_signed_cert
from tests.security.test_webhook_allowlist import receiver_factory, requests_in  # noqa: F401
from tests.slowloris import SlowLoris, deliveries

STALLED = 256


def test_a_new_connection_sheds_the_oldest_stalled_one(caplog):
    import socket
    import threading
    import time
    import uuid

    from edgeslim.deploy.webhook import make_server

    secret, recorded = uuid.uuid4().hex, []
    server = make_server("127.0.0.1", 0, secret, "edge-candidate", models=["m"], read_timeout=60,
                         on_request=lambda *a: recorded.append(a) or True, max_connections=8)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    caplog.set_level("INFO", logger="edgeslim.webhook")
    loris = SlowLoris(server.server_port, 7)  # with ``first``, the 8 the receiver allows
    first = socket.create_connection(("127.0.0.1", server.server_port), timeout=60)
    try:
        first.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # the oldest: it is the one shed
        # Once the receiver has read those bytes, ``first`` is a stalled connection like the others (a
        # connection with bytes waiting unread is making progress, and is passed over when one is shed).
        deadline = time.monotonic() + 60
        while not any(c.buf for c in list(server._conns.values())) and time.monotonic() < deadline:
            time.sleep(0.01)
        loris.start()
        got = deliveries(server.server_port, secret, 2, timeout=60)
        assert [status for status, _ in got] == [202, 202], got
        assert first.recv(4096).startswith(b"HTTP/1.1 408")
        assert [a[:2] for a in recorded] == [("m", "1"), ("m", "2")]
    finally:
        first.close()
        loris.stop()
        server.shutdown()
        server.server_close()
    shed = [r.getMessage() for r in caplog.records if "shed after" in r.getMessage()]
    assert shed and all("the most allowed (408)" in m for m in shed), shed


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_signed_deliveries_get_through_256_stalled_connections(receiver_factory, s3_store, tmp_path, scheme):
    args, cafile = ["--model", "m", "--read-timeout", "60"], None
    if scheme == "https":
        cafile, key = self_signed_cert(tmp_path / "tls")
        args += ["--tls-cert", str(cafile), "--tls-key", str(key)]
    rx = receiver_factory(*args)
    loris = SlowLoris(rx.port, STALLED) if scheme == "http" else SlowLoris(rx.port, STALLED, payload=b"")
    loris.start()
    try:
        got = deliveries(rx.port, rx.secret, 3, cafile=cafile, timeout=60)
        assert [status for status, _ in got] == [202, 202, 202], got
        assert loris.open_now == STALLED  # the attacker kept its 256 open throughout
    finally:
        loris.stop()
    assert sorted(r["version"] for r in requests_in(s3_store)) == ["1", "2", "3"]
    if scheme == "http":
        assert rx.saw("shed after") and rx.saw("the most allowed (408)")
    assert not rx.saw("Traceback") and not rx.saw("(503)")
    assert rx.proc.poll() is None
