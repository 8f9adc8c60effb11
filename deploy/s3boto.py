"""boto3 signs, edgeslim's bounded transport carries: a boto3 client's S3 calls under the same bounds.

botocore's own HTTP has a timeout per read but no deadline for a whole answer (a server that
trickles a byte at a time holds a call for as long as it likes), and it reads a listing page
whole into memory before parsing it. :func:`carry` registers a ``before-send`` handler (botocore's
documented hook that may answer a request itself) that sends each request boto3 has signed through
a :class:`~edgeslim.deploy.s3transport.Transport`, and hands botocore the answer:

- ``GetObject`` bodies stream through the transport's body (its deadline, its length check);
- every other answer is read up to a cap before botocore parses it: a listing page up to
  ``MAX_LIST_PAGE_BYTES``, anything else up to ``MAX_SMALL_BODY``; more is a
  :class:`~edgeslim.deploy.s3transport.BadResponseError`.

boto3 keeps its credential chain, its signing and its retries of S3's error answers; HTTPS
verifies against the CA certificates botocore would use. When the environment names a proxy for
the endpoint (``HTTPS_PROXY``), botocore carries the calls itself: the transport speaks only
directly to the endpoint.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from edgeslim.deploy.s3transport import MAX_LIST_PAGE_BYTES, MAX_SMALL_BODY, BadResponseError, Transport, deadline_for


class _Answer:
    """An answer read whole (and capped), as botocore reads a response's ``raw``."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, amt: int = 1 << 16):
        data, self._data = self._data, b""
        for i in range(0, len(data), amt):
            yield data[i:i + amt]

    def read(self, amt: int | None = None) -> bytes:
        n = len(self._data) if amt is None else amt
        out, self._data = self._data[:n], self._data[n:]
        return out

    def close(self) -> None:
        self._data = b""


class _Carrier:
    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def send(self, request, event_name: str = "", **_):
        """botocore's ``before-send``: the answer to ``request``, or None to let botocore send it."""
        from botocore.awsrequest import AWSResponse

        t = self.t
        url = urlsplit(request.url)
        default = 443 if url.scheme == "https" else 80
        if (url.scheme, url.hostname, url.port or default) != (t.scheme, t.hostname, t.port):
            return None  # another endpoint (a redirect to a region, say): botocore's own HTTP
        operation = event_name.rsplit(".", 1)[-1]
        headers = {k: v for k, v in request.headers.items() if k.lower() != "expect"}  # the body goes at once
        body = request.body
        if hasattr(body, "read"):
            body = body.read()
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn, resp = t.exchange(request.method, path, body, headers, deadline_for(t.deadline_s, body))
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        try:
            t.content_length(hdrs)
        except BadResponseError:
            conn.close()
            raise
        if operation == "GetObject" and resp.status < 300:
            return AWSResponse(request.url, resp.status, hdrs, t.body(conn, resp))
        cap = MAX_LIST_PAGE_BYTES if operation == "ListObjectsV2" and resp.status < 300 else MAX_SMALL_BODY
        data = t.finish(conn, resp, cap + 1)
        if len(data) > cap:
            raise BadResponseError(f"{t.host_header}: an answer to {operation} over {cap} bytes")
        return AWSResponse(request.url, resp.status, hdrs, _Answer(data))


def carry(client, *, timeout_s: float, deadline_s: float | None) -> None:
    """Send ``client``'s S3 calls through a bounded transport (unless a proxy is set for its endpoint)."""
    from botocore.httpsession import DEFAULT_CA_BUNDLE
    from botocore.utils import get_environ_proxies

    endpoint = client.meta.endpoint_url
    if get_environ_proxies(endpoint):
        return
    # The CA certificates botocore verifies against: AWS_CA_BUNDLE (the transport reads it), then
    # REQUESTS_CA_BUNDLE, then its own bundle.
    cafile = os.environ.get("REQUESTS_CA_BUNDLE") or DEFAULT_CA_BUNDLE
    transport = Transport(endpoint, timeout_s=timeout_s, deadline_s=deadline_s, max_pool_connections=64,
                          cafile=cafile)
    client.meta.events.register("before-send.s3", _Carrier(transport).send)
