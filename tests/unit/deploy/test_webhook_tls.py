"""The receivers over TLS, and the line that says what MLflow's server needs to deliver to a URL.

The receiver is the real hardened server on loopback with a certificate made here; what MLflow's
server accepts is checked against MLflow's own URL validation (``mlflow.utils.validation``).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time

import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy import webhook_tls
from edgeslim.deploy.webhook import make_server
from edgeslim.deploy.webhook_tls import ALLOW_HTTP, ALLOW_PRIVATE, TlsFiles, mlflow_needs, needs_line, receiver_url
from tests.fleet_it_helpers import http_request, https_request, mlflow_signed_headers, self_signed_cert

SECRET = "tls-secret-for-tests"


@pytest.fixture
def tls_receiver(tmp_path):
    """A fleet webhook receiver serving HTTPS; yields (port, recorded requests, cert path)."""
    cert, key = self_signed_cert(tmp_path / "tls")
    got = []
    server = make_server("127.0.0.1", 0, SECRET, "edge-candidate", models=["m"], read_timeout=1.0, workers=2,
                         on_request=lambda *a: got.append(a) or True, tls=TlsFiles(str(cert), str(key)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, got, cert
    server.shutdown()
    server.server_close()
    t.join(10)


def _event(version="3"):
    return json.dumps({"entity": "model_version_alias", "action": "created",
                       "data": {"name": "m", "alias": "edge-candidate", "version": version}}).encode()


def test_a_signed_delivery_over_https_is_recorded_and_plain_http_or_silence_is_closed(tls_receiver):
    server, got, cert = tls_receiver
    assert server.scheme == "https"
    body = _event()
    status, text = https_request(server.server_port, "POST", "/", body, mlflow_signed_headers(SECRET, body),
                                 cafile=cert)
    assert (status, text) == (202, "request recorded\n")
    assert [a[:3] for a in got] == [("m", "3", "edge-candidate")]
    # The name in the certificate is checked too (localhost and 127.0.0.1 are in it).
    assert https_request(server.server_port, "POST", "/", b"{}", {}, cafile=cert, host="localhost")[0] == 401
    # Plain HTTP to the TLS port: the handshake fails, the connection is closed, the server goes on.
    with pytest.raises((ConnectionError, OSError)):
        http_request(server.server_port, "POST", "/", body, mlflow_signed_headers(SECRET, body), timeout=10)
    # A client that connects and never starts its handshake is closed after read_timeout (1 s here; the
    # socket's own timeout only stops a hang).
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=300) as s:
        assert s.recv(100) == b""
    # A client that does not trust the certificate gives up; the server still answers the next one.
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")
    body = _event("4")
    assert https_request(server.server_port, "POST", "/", body, mlflow_signed_headers(SECRET, body),
                         cafile=cert)[0] == 202


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path / "a")
    files = TlsFiles(str(cert), str(key))
    first = files.context()
    assert files.context() is first  # unchanged files: the same context
    new_cert, new_key = self_signed_cert(tmp_path / "b")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    monkeypatch.setattr(webhook_tls, "RELOAD_CHECK_S", 0.0)
    second = files.context()
    assert second is not first
    key.write_text("not a key")  # a renewal half-written: the last good pair stays
    os.utime(key, (time.time() + 5, time.time() + 5))
    assert files.context() is second


def test_tls_flags_are_refused_in_one_line_when_incomplete_or_unreadable(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    with pytest.raises(ConfigError, match="give both the certificate"):
        TlsFiles(str(cert), "")
    with pytest.raises(ConfigError, match="cannot read .*missing.pem"):
        TlsFiles(str(cert), str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="cannot load .*want a PEM certificate"):
        TlsFiles(str(key), str(key))
    with pytest.raises(ConfigError, match="--url 'ftp://x/'"):
        receiver_url("127.0.0.1", 1, tls=False, url="ftp://x/")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8089/", "https://127.0.0.1:8089/", "http://localhost:8089/",
                                 "https://8.8.8.8:8443/", "http://10.1.2.3/", "https://[::1]:8443/"])
def test_what_the_line_asks_of_mlflow_is_what_mlflow_itself_needs(url, monkeypatch):
    """MLflow's own check refuses the URL with its defaults exactly when the line names settings, and
    accepts it with the settings the line names."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_webhook_url

    needs, why = mlflow_needs(url)
    for var in ("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"):
        monkeypatch.delenv(var, raising=False)
    if needs:
        with pytest.raises(MlflowException):
            _validate_webhook_url(url)
        line = needs_line(url)
        assert line.startswith(f"MLflow's server refuses webhooks to {url} by default")
        assert "\n" not in line and all(n in line for n in needs)
    else:
        _validate_webhook_url(url)
        assert needs_line(url) is None and why == ""
    for setting in needs:
        k, v = setting.split("=")
        monkeypatch.setenv(k, v)
    _validate_webhook_url(url)
    assert (ALLOW_HTTP in needs) == url.startswith("http:")
    assert (ALLOW_PRIVATE in needs) == ("8.8.8.8" not in url)


def test_the_default_url_is_the_listening_address_with_the_scheme_served():
    assert receiver_url("127.0.0.1", 8089, tls=False) == "http://127.0.0.1:8089/"
    assert receiver_url("::1", 8443, tls=True) == "https://[::1]:8443/"
    assert receiver_url("0.0.0.0", 8443, tls=True) == f"https://{socket.getfqdn()}:8443/"
    assert receiver_url("0.0.0.0", 1, tls=True, url="https://hook.example.com/") == "https://hook.example.com/"


def test_fleet_webhook_serves_tls_and_says_what_mlflow_needs_for_its_url(tmp_path):
    import subprocess
    import sys

    cert, key = self_signed_cert(tmp_path / "tls")
    env = dict(os.environ, EDGESLIM_WEBHOOK_SECRET=SECRET)
    env.pop("EDGESLIM_FLEET_SIGNING_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "edgeslim", "fleet", "webhook", "lab", "--model", "m",
                             "--store", str(tmp_path / "store"), "--port", "0", "--tls-cert", str(cert),
                             "--tls-key", str(key)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith("listening on https://127.0.0.1:"), first
        port = int(first.split("https://127.0.0.1:", 1)[1].split("/", 1)[0])
        assert second.strip() == (f"MLflow's server refuses webhooks to https://127.0.0.1:{port}/ by default "
                                  "(127.0.0.1 is not a public address): start `mlflow server` with "
                                  "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true")
        body = _event()
        assert https_request(port, "POST", "/", body, mlflow_signed_headers(SECRET, body), cafile=cert)[0] == 202
    finally:
        proc.terminate()
        proc.wait(30)
