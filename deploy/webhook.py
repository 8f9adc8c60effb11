"""Start rollouts from MLflow registry webhooks (``model_version_alias.created``).

``edgeslim fleet webhook FLEET --alias edge-candidate`` listens for MLflow's
webhook POSTs, checks their HMAC signature (``X-MLflow-Signature: v1,<b64>``
over ``<delivery id>.<timestamp>.<body>``) with the secret in
``$EDGESLIM_WEBHOOK_SECRET``, refuses stale timestamps (replay), and runs
:func:`~edgeslim.deploy.controller.follow_alias` for the alias it watches.
Register it with ``MlflowClient().create_webhook(name, url, events=["model_version_alias.created"],
secret=...)``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger("edgeslim.webhook")
MAX_SKEW_S = 300


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


def make_server(host: str, port: int, secret: str, alias: str,
                on_alias: Callable[[str, str, str], None]) -> ThreadingHTTPServer:
    """An HTTP server that calls ``on_alias(model, version, alias)`` for matching, signed events."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # route through logging, not stderr
            log.info("%s %s", self.address_string(), fmt % args)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not verify_signature(secret, self.headers.get("X-MLflow-Delivery-Id", ""),
                                    self.headers.get("X-MLflow-Timestamp", ""), body,
                                    self.headers.get("X-MLflow-Signature", "")):
                self.send_response(401)
                self.end_headers()
                return
            try:
                event = json.loads(body)
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            data = event.get("data") or {}
            if (event.get("entity"), event.get("action")) == ("model_version_alias", "created") \
                    and data.get("alias") == alias:
                # Answer at once; a rollout takes minutes and MLflow retries slow hooks.
                threading.Thread(target=on_alias, args=(data["name"], str(data["version"]), alias),
                                 daemon=True).start()
                self.send_response(202)
            else:
                self.send_response(204)
            self.end_headers()

    return ThreadingHTTPServer((host, port), Handler)
