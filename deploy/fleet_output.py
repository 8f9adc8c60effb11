"""What ``edgeslim fleet`` prints for people: aligned tables and ``key: value`` blocks, times in
ISO-8601 UTC. ``--json`` prints the records themselves instead (for scripts).

:func:`render` takes a command's result as the JSON output holds it: a rollout (``get``, ``create``
and the other rollout commands), a list of rollouts, the devices, or any other record. A record
prints as ``key: value`` lines, a nested record indented below its key, and a list of records, or a
record of records (devices by id), as a table.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

MISSING = "-"


def iso(t: Any) -> str:
    """Seconds since the epoch as ISO-8601 UTC (``2025-01-31T12:00:00Z``); anything else as it is."""
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return MISSING if t is None else str(t)
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_time(key: str) -> bool:
    """Keys whose numbers are moments (seconds since the epoch): ``*_at``, ``at`` and ``since``."""
    return key.endswith("_at") or key in ("at", "since")


def cell(key: str, value: Any) -> str:
    """One value as a table cell or after ``key:``."""
    if value is None:
        return MISSING
    if is_time(key):
        return iso(value)
    if key == "model" and isinstance(value, dict) and "name" in value:
        alias = f" @{value['alias']}" if value.get("alias") else ""
        return f"{value['name']} v{value.get('version')}{alias}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(str(v) for v in value) or MISSING
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def table(rows: list[dict[str, Any]], *, indent: int = 0) -> list[str]:
    """Rows as an aligned table under a header of their keys in upper case."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = [c.upper() for c in columns]
    body = [[cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    pad = " " * indent
    return [pad + "  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body)]


# The first column of a table made from a record of records: what its keys are.
_KEYED_BY = {"devices": "device", "roles": "role"}


def _records(value: Any, key: str = "") -> list[dict[str, Any]] | None:
    """``value`` as table rows: a non-empty list of records, or a record of records (each row then
    starts with its key, in a column named for what ``key`` holds)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return value
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return [{_KEYED_BY.get(key, "name"): k, **v} for k, v in value.items()]
    return None


def block(obj: dict[str, Any], indent: int = 0) -> list[str]:
    """A record as ``key: value`` lines; nested records indented, records of records as tables."""
    pad = " " * indent
    width = max((len(k) for k in obj), default=0) + 1
    lines: list[str] = []
    for k, v in obj.items():
        rows = _records(v, k) if k != "model" else None
        if rows is not None:
            lines.append(f"{pad}{k}:")
            lines += table(rows, indent=indent + 2)
        elif isinstance(v, dict) and v and k != "model":
            lines.append(f"{pad}{k}:")
            lines += block(v, indent + 2)
        else:
            lines.append(f"{pad}{(k + ':').ljust(width)} {cell(k, v)}")
    return lines


def _devices(got: dict[str, Any]) -> list[str]:
    """``edgeslim fleet devices``: the enrolled devices and what each runs, then those waiting to be enrolled."""
    from edgeslim.deploy import trust

    def fingerprint(pub: Any) -> str:
        try:
            return trust.key_id(trust.public_from_b64(pub))
        except Exception:  # a device may register junk; the table still prints
            return MISSING

    enrolled = []
    for dev, d in (got.get("enrolled") or {}).items():
        st = d.get("status") if isinstance(d.get("status"), dict) else {}
        cur = st.get("current") if isinstance(st.get("current"), dict) else {}
        enrolled.append({"device": dev, "class": d.get("device_class"), "state": st.get("state"),
                         "running": str(cur.get("sha256") or "")[:12] or None, "backend": cur.get("backend"),
                         "heartbeat_at": st.get("heartbeat_at"), "agent": st.get("agent_version"),
                         "fingerprint": fingerprint(d.get("public_key"))})
    pending = [{"device": dev, "class": d.get("device_class"), "fingerprint": d.get("fingerprint")}
               for dev, d in (got.get("pending") or {}).items()]
    lines = ["enrolled:", *(table(enrolled, indent=2) if enrolled else ["  (none)"])]
    lines += ["pending (registered, not enrolled: check the fingerprint, then `edgeslim fleet enrol FLEET DEVICE`):",
              *(table(pending, indent=2) if pending else ["  (none)"])]
    return lines


def render(command: str, obj: Any) -> str:
    """What ``edgeslim fleet COMMAND`` prints for ``obj``, its result."""
    if command == "devices" and isinstance(obj, dict):
        lines = _devices(obj)
    elif isinstance(obj, list) and not obj:
        lines = ["(no rollouts to run)" if command == "reconcile" else "(no rollouts)" if command == "list" else "(none)"]
    elif command == "list" and isinstance(obj, list):
        lines = table([{"name": r.get("name"), "state": r.get("state"), "model": r.get("model")} for r in obj])
    elif isinstance(obj, list):
        lines = table(obj) if _records(obj) else [cell("", obj)]
    elif command == "enrol" and _records(obj, "devices"):
        lines = table(_records(obj, "devices"))
    elif isinstance(obj, dict):
        lines = block(obj)
    else:
        lines = [cell("", obj)]
    return "\n".join(lines)
