"""TLS for the webhook receivers, and what MLflow's server needs to deliver to a receiver's URL.

MLflow's server checks a webhook's URL when the webhook is created and again at each delivery,
with its own environment (``mlflow.utils.validation._validate_webhook_url``):

- the scheme must be in ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES`` (default ``https`` only);
- unless ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``, the host must resolve to public addresses
  only (loopback, 10/8, 172.16/12, 192.168/16, link-local and cluster addresses are refused).

Its delivery session ignores the environment (``requests`` with ``trust_env = False``): a receiver's
certificate is verified against the CA bundle of ``certifi`` in the server's Python, never
``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE``.

:func:`mlflow_needs` names the server settings a URL needs; :class:`TlsFiles` is the server side of
``--tls-cert``/``--tls-key``, reloaded when the files change (a renewed Kubernetes secret).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse

from edgeslim.components.common.errors import ConfigError

ALLOW_HTTP = "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https"
ALLOW_PRIVATE = "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true"
RELOAD_CHECK_S = 30.0


class TlsFiles:
    """A server TLS context from a certificate chain and its key (PEM), reloaded when either changes.

    Raises:
        ConfigError: only one of the two given, or they do not load (one line, naming the file).
    """

    def __init__(self, cert: str, key: str, *, flag: str = "--tls-cert/--tls-key") -> None:
        if bool(cert) != bool(key):
            raise ConfigError(f"{flag}: give both the certificate (PEM, with its chain) and its private key")
        self.cert, self.key, self.flag = str(cert), str(key), flag
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._ctx = self._load()

    def _stat(self) -> tuple:
        try:
            return tuple((s.st_mtime_ns, s.st_size) for s in (os.stat(self.cert), os.stat(self.key)))
        except OSError as exc:
            raise ConfigError(f"{self.flag}: cannot read {exc.filename}: {exc.strerror}") from None

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{self.flag}: cannot load {self.cert} with {self.key} "
                              f"({getattr(exc, 'reason', None) or exc}); want a PEM certificate and its key") from None
        return ctx

    def context(self) -> ssl.SSLContext:
        """The current context; the files are checked for a change at most every RELOAD_CHECK_S.
        A renewed pair that does not load keeps the previous one."""
        with self._lock:
            if time.monotonic() - self._checked >= RELOAD_CHECK_S:
                self._checked = time.monotonic()
                try:
                    stamp = self._stat()
                    if stamp != self._stamp:
                        self._ctx, self._stamp = self._load(), stamp
                except ConfigError:
                    pass
            return self._ctx


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; else a ConfigError naming ``--url``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--url {url!r}: want the http(s) URL given to MLflow's create_webhook, "
                          "e.g. https://edgeslim-trigger.mlops.svc:8089/")
    return url


def receiver_url(listen: str, port: int, *, tls: bool, url: str | None = None) -> str:
    """The URL MLflow delivers to: ``url`` when given, else the listening address (this host's
    name for a wildcard address)."""
    if url:
        return check_url(url)
    host = socket.getfqdn() if listen in ("", "0.0.0.0", "::") else listen
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}/"


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


def mlflow_needs(url: str) -> tuple[list[str], str]:
    """The settings MLflow's server needs to accept ``url`` as a webhook, and why (one phrase)."""
    parsed = urllib.parse.urlparse(url)
    needs, why = [], []
    if parsed.scheme != "https":
        needs.append(ALLOW_HTTP)
        why.append(f"{parsed.scheme}:// is refused")
    host = parsed.hostname or ""
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(host, parsed.port or 443, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        addresses = set()
    private = sorted(a for a in addresses if not _public(a))
    if private:
        needs.append(ALLOW_PRIVATE)
        why.append(f"{host} is not a public address" + (f" ({private[0]})" if private[0] != host else ""))
    return needs, "; ".join(why)


def needs_line(url: str) -> str | None:
    """One line for the receiver's start: what MLflow's server must be started with to deliver to
    ``url``; None when its defaults accept it."""
    needs, why = mlflow_needs(url)
    if not needs:
        return None
    tls = ("" if urllib.parse.urlparse(url).scheme == "https" else
           " (or serve TLS with --tls-cert/--tls-key: an https URL needs no scheme setting)")
    return (f"MLflow's server refuses webhooks to {url} by default ({why}): start `mlflow server` with "
            f"{' '.join(needs)}{tls}")
