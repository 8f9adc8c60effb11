"""Bounded reading of untrusted JSON: size and nesting are checked before parsing.

Everything the fleet reads from the store, a device or a webhook may be hostile:
a 300 MB manifest, or 4 KB of ``[[[[...`` that makes :func:`json.loads` recurse
until Python raises ``RecursionError``. :func:`loads` refuses both with a
:class:`BoundedInputError` before the parser runs. The depth scan skips string
contents: one pass over the text, linear in its size whatever it holds (an unclosed
string of escaped quotes costs what any text of its length costs).

Imports only the standard library: the device agent uses this module.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgeslim.components.common.errors import FleetError

# Caps, in bytes, of what the fleet reads. A manifest carries the golden input and outputs of the
# health check (base64 float32): a 640x640 RGB input is 6.6 MB of base64.
MAX_MANIFEST_BYTES = 32 << 20
MAX_STATUS_BYTES = 1 << 20
MAX_SMALL_BYTES = 256 << 10  # registrations, locks, requests, roots, timestamps, inventories
MAX_WEBHOOK_BYTES = 1 << 20
MAX_DEPTH = 32

# One token of the depth scan: a whole string, a bracket, or a quote that opens a string never closed.
# The string's quantifiers are possessive, so a string that does not close fails in one pass with no
# backtracking, and the scan stops at the first such quote: every byte is looked at a bounded number
# of times.
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]|"', re.DOTALL)


class BoundedInputError(FleetError):
    """Untrusted input is oversized, nested too deep or not JSON. ``reason`` is one word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def depth(data: bytes, limit: int | None = None) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, ignoring brackets inside strings.

    Linear in ``len(data)``. The scan stops at a string that is never closed (the text is not JSON,
    which the parser then says), and as soon as the nesting passes ``limit``.
    """
    deepest = level = 0
    for m in _TOKEN.finditer(data):
        tok = m.group()
        if tok in (b"[", b"{"):
            level += 1
            if level > deepest:
                deepest = level
                if limit is not None and deepest > limit:
                    break
        elif tok in (b"]", b"}"):
            level -= 1
        elif tok == b'"':
            break
    return deepest


def loads(data: bytes | str, *, what: str, max_bytes: int = MAX_SMALL_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON after checking its size and nesting.

    Raises:
        BoundedInputError: ``oversized``, ``too-deep`` or ``malformed``, naming ``what``.
    """
    if isinstance(data, str):
        data = data.encode()
    if len(data) > max_bytes:
        raise BoundedInputError("oversized", f"{what} is {len(data)} bytes, over the cap of {max_bytes}: refused unread")
    if depth(data, max_depth) > max_depth:
        raise BoundedInputError("too-deep", f"{what} nests more than {max_depth} levels deep: refused")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BoundedInputError("malformed", f"{what} is not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
