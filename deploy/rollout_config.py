"""A rollout's settings (``-C key=value``) and the states a rollout record moves through."""

from __future__ import annotations

import dataclasses
from typing import Any

from edgeslim.components.common.config import Config
from edgeslim.components.common.errors import ConfigError

TERMINAL = ("succeeded", "aborted", "withdrawn", "failed")
WAITING = ("soaking", "awaiting-approval")  # after the canary wave, before promotion
ACTIVE = ("pending", "running", "aborting", *WAITING)
PROMOTE = ("auto", "soak", "approval")
MAX_LOCK_TTL_S = 3600.0
MAX_EXPIRY_S = 30 * 24 * 3600.0  # a manifest is never valid longer (a stored record cannot stretch it)
# Config keys that look like secrets are refused: -C values end up in shell history and logs.
_SECRET_WORDS = ("secret", "password", "access_key", "token", "credential", "session_key")


@dataclasses.dataclass(frozen=True)
class WaveRolloutConfig(Config):
    """How a rollout moves through the fleet.

    Attributes:
        waves: cumulative percentages of the fleet per wave; the first wave is the
            canary and always has at least one device; a last wave of 100 is implied.
        max_failure_pct: abort when failed/reported devices exceed this percentage.
        min_reported: ...but only once at least this many devices have reported.
        wave_timeout_s: a device silent this long after its manifest counts as failed.
        poll_interval_s: how often the controller reads statuses.
        expiry_s: manifests expire this long after signing (against freeze attacks).
        atol, rtol: tolerance of the golden-output health check on devices.
        iou, score_tol: for a detector, the health check compares decoded detections
            instead: each golden box needs a same-class box at this IoU whose score is
            within ``score_tol`` (int8 engines and ONNX Runtime differ in raw maps, not boxes).
        latency_budget_ms: the device's median latency must stay under this (None: no budget).
        health_repeats: timed runs of the golden input.
        device_class: roll out only to devices of this class (None: all classes).
        canary_alias, stable_alias: moved on success (None: leave aliases alone).
        lock_ttl_s: a lock not renewed for this long may be taken over.
        promote: after the canary wave, ``auto`` goes on at once; ``soak`` waits ``soak_s``
            seconds while the canaries keep reporting (one that fails or is silent for
            ``wave_timeout_s`` counts as failed, against ``max_failure_pct``); ``approval``
            waits for ``edgeslim fleet approve`` (state ``awaiting-approval``).
        soak_s: the soak time of ``promote=soak``, from the canary wave's end.
    """

    waves: list[float] = dataclasses.field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    max_failure_pct: float = 10.0
    min_reported: int = 1
    wave_timeout_s: float = 600.0
    poll_interval_s: float = 2.0
    expiry_s: float = 7 * 24 * 3600.0
    atol: float = 1e-3
    rtol: float = 1e-3
    iou: float = 0.9
    score_tol: float = 0.05
    latency_budget_ms: float | None = None
    health_repeats: int = 5
    device_class: str | None = None
    canary_alias: str | None = "edge-canary"
    stable_alias: str | None = "edge-stable"
    lock_ttl_s: float = 900.0
    promote: str = "auto"
    soak_s: float = 3600.0

    def validate(self) -> None:
        if not self.waves:
            raise ConfigError("waves: empty; give cumulative percentages such as 1,10,50,100")
        prev = 0.0
        for w in self.waves:
            if not 0 < w <= 100 or w < prev:
                raise ConfigError(f"waves: {self.waves} must rise within (0, 100], e.g. 1,10,50,100")
            prev = w
        self.require(0 <= self.max_failure_pct <= 100, "max_failure_pct", "expected 0..100")
        self.require(0 < self.iou <= 1, "iou", "expected an IoU in (0, 1], e.g. 0.9")
        self.require(0 <= self.score_tol < 1, "score_tol", "expected a score difference in [0, 1), e.g. 0.05")
        self.require(self.min_reported >= 1, "min_reported", "expected >= 1")
        for name in ("wave_timeout_s", "poll_interval_s", "expiry_s", "lock_ttl_s"):
            self.require(getattr(self, name) > 0, name, "expected a positive number of seconds")
        self.require(self.expiry_s <= MAX_EXPIRY_S, "expiry_s", f"at most {MAX_EXPIRY_S:.0f} s (30 days)")
        self.require(self.lock_ttl_s <= MAX_LOCK_TTL_S, "lock_ttl_s", f"at most {MAX_LOCK_TTL_S:.0f} s")
        self.require(self.promote in PROMOTE, "promote", "expected auto, soak or approval")
        self.require(self.soak_s >= 0, "soak_s", "expected a number of seconds >= 0")

    @classmethod
    def from_strings(cls, raw: dict[str, Any]) -> "WaveRolloutConfig":
        """From ``-C key=value`` strings (MLflow CLI) or already-typed values."""
        out: dict[str, Any] = {}
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in (raw or {}).items():
            if any(w in key.lower() for w in _SECRET_WORDS):
                raise ConfigError(
                    f"{key}: credentials are never passed as config (they would reach logs and "
                    "MLflow); use the AWS environment variables or a profile"
                )
            if key not in hints or not isinstance(value, str):
                out[key] = value
                continue
            t = str(hints[key])
            try:
                if value.lower() in ("none", "null", ""):
                    out[key] = None
                elif "list" in t:
                    out[key] = [float(v) for v in value.replace(";", ",").split(",") if v.strip()]
                elif "int" in t:
                    out[key] = int(value)
                elif "float" in t:
                    out[key] = float(value)
                else:
                    out[key] = value
            except ValueError:
                raise ConfigError(f"{key}: got {value!r}; expected {t}") from None
        return cls.from_dict(out)

