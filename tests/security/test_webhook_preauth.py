"""Finding 7: the webhook before authentication. A real ``edgeslim fleet webhook`` process, hit
over real loopback sockets by a client that has no secret (and, for the replay, by one that
recorded a signed delivery)."""

from __future__ import annotations

import socket
import time

import pytest

from edgeslim.deploy import bounded
from tests.fleet_it_helpers import wait_for
from tests.security.test_webhook_allowlist import alias_event, receiver_factory, requests_in, signed_headers  # noqa: F401

pytestmark = pytest.mark.slow


def test_an_oversized_body_is_refused_unread_and_the_receiver_stays_small(receiver_factory, s3_store):
    rx = receiver_factory("--model", "m")
    assert rx.deliver(alias_event("m", "1"))[0] == 202  # warm: the store client and its connection exist
    before = rx.status("VmRSS")
    claimed = 200 << 20
    assert claimed > bounded.MAX_WEBHOOK_BYTES
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", rx.port), timeout=60) as s:
            s.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {claimed}\r\n\r\n".encode())
            chunk = b"[" * (1 << 16)
            try:
                for _ in range(64):  # 4 MB of the promised 200 MB
                    s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = b""
            try:
                while data := s.recv(4096):
                    answer += data
            except ConnectionResetError:
                pass
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    grown_kb = rx.status("VmRSS") - before
    assert grown_kb < 8 * 1024, f"the receiver grew by {grown_kb} kB reading bodies it refused"
    # No Content-Length at all: 411, before any body is read.
    with socket.create_connection(("127.0.0.1", rx.port), timeout=60) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 411")
    # Still serving.
    assert rx.deliver(alias_event("m", "2"))[0] == 202
    assert sorted(r["version"] for r in requests_in(s3_store)) == ["1", "2"]


def test_stalled_connections_hold_no_threads_and_a_signed_event_still_gets_through(receiver_factory, s3_store):
    workers = 16
    rx = receiver_factory("--model", "m", "--workers", str(workers), "--read-timeout", "20")
    assert rx.deliver(alias_event("m", "1"))[0] == 202
    stalled = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", rx.port), timeout=60)
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")  # and never another byte
            stalled.append(s)
        time.sleep(1.0)
        threads = rx.status("Threads")
        assert threads <= workers + 4, f"{threads} threads for 200 stalled connections"
        # A signed delivery is answered while all 200 are held (generous client timeout, no timed assertion).
        assert rx.deliver(alias_event("m", "2"))[0] == 202
        for s in stalled:  # ...and they were not dropped to make room: they are still open
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        # They are closed once --read-timeout has passed since they connected, with 408.
        first = stalled[0]
        first.settimeout(60)
        assert first.recv(4096).startswith(b"HTTP/1.1 408")
        assert rx.status("Threads") <= workers + 4
    finally:
        for s in stalled:
            s.close()
    assert sorted(r["version"] for r in requests_in(s3_store)) == ["1", "2"]
    assert rx.proc.poll() is None


def test_a_replayed_delivery_is_recorded_once(receiver_factory, s3_store):
    rx = receiver_factory("--model", "m")
    body = alias_event("m", "3")
    headers = signed_headers(rx.secret, body)  # one recorded delivery, replayed as is
    answers = [rx.post(body, headers) for _ in range(3)]
    assert [a[0] for a in answers] == [202, 200, 200]
    assert all("duplicate delivery ignored" in a[1] for a in answers[1:])
    got = requests_in(s3_store)
    assert len(got) == 1 and got[0]["delivery_id"] == headers["X-MLflow-Delivery-Id"]
    wait_for(lambda: rx.saw("duplicate delivery ignored"), 30, "the duplicate line in the receiver's log")
