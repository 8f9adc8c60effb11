"""What every part of a fleet's controller shares: the store, the fleet's names in it, and time.

The controller (:class:`~edgeslim.deploy.controller.Controller`) is made of parts, one per
concern (trust, the lock, records, devices, targets, promotion, the waves, the MLflow
registry); each is a :class:`FleetPart` over one :class:`FleetContext`. Swapping the context's
``clock`` or ``sleep`` (unit tests of the wave logic) swaps it for every part at once.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from edgeslim.deploy.store import FleetKeys, ObjectStore


@dataclasses.dataclass
class FleetContext:
    """One fleet in one store, with the clock and sleep its controller runs on."""

    store: ObjectStore
    fleet: str
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    keys: FleetKeys = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.keys = FleetKeys(self.fleet)  # checks the fleet's name


class FleetPart:
    """One concern of a fleet's controller, reading the shared :class:`FleetContext`."""

    def __init__(self, ctx: FleetContext) -> None:
        self.ctx = ctx

    @property
    def store(self) -> ObjectStore:
        return self.ctx.store

    @property
    def fleet(self) -> str:
        return self.ctx.fleet

    @property
    def keys(self) -> FleetKeys:
        return self.ctx.keys

    def clock(self) -> float:
        return self.ctx.clock()

    def sleep(self, seconds: float) -> None:
        self.ctx.sleep(seconds)
