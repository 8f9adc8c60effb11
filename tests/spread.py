"""Measured values beside the thresholds they are held to.

A threshold on accuracy, SQNR or loss is only as good as the spread it was set from. A
test wraps each value it bounds in ``measured(name, value)``: in a normal run that returns
the value and does nothing else. ``bash tests/spread.sh`` runs the numerical tests over
torch's CPU kernels (``ATEN_CPU_CAPABILITY=default|avx2|avx512``) and over seeds of the tiny
reference models they train (``EDGESLIM_TEST_SEED``), with ``EDGESLIM_SPREAD_LOG`` set, and
writes the minimum and maximum of every name to ``tests/spread.json``. The comment beside
each threshold quotes that range and the margin left.

Why seeds stand in for other machines: once one float sum rounds differently (another
CPU's kernels, another thread count), a training run follows another trajectory, and ends
about as far from the first as a run with another seed does.
"""

from __future__ import annotations

import json
import os

SEED = int(os.environ.get("EDGESLIM_TEST_SEED", "0"))


def measured(name: str, value: float) -> float:
    """Return ``value``; under ``tests/spread.sh`` also record it as ``name``."""
    log = os.environ.get("EDGESLIM_SPREAD_LOG")
    if log:
        row = {"name": name, "value": float(value), "seed": SEED,
               "kernels": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
               "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]}
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    return value


def summarise(log: str) -> dict:
    """min, max and count of each recorded name, with the runs it came from."""
    rows = [json.loads(line) for line in open(log) if line.strip()]
    out: dict = {}
    for r in rows:
        s = out.setdefault(r["name"], {"min": r["value"], "max": r["value"], "n": 0, "runs": set()})
        s["min"], s["max"] = min(s["min"], r["value"]), max(s["max"], r["value"])
        s["n"] += 1
        s["runs"].add(f"{r['kernels']}/seed{r['seed']}")
    for s in out.values():
        s["min"], s["max"], s["runs"] = round(s["min"], 4), round(s["max"], 4), " ".join(sorted(s["runs"]))
    return dict(sorted(out.items()))


if __name__ == "__main__":
    import sys

    print(json.dumps(summarise(sys.argv[1]), indent=1))
