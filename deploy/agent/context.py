"""What every part of a device's agent shares: the store, the device's names, its settings, its disk, its clock.

The agent (:class:`~edgeslim.deploy.agent.device.Agent`) is made of parts, one per concern: the
state it keeps (``state.py``), the fleet's metadata it follows (``metadata.py``), what it fetches
(``fetch.py``), what it installs (``install.py``) and what it reports (``report.py``); each reads
one :class:`AgentContext`. Swapping the context's ``store``, ``settings`` or ``clock`` swaps it for
every part at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

from edgeslim.deploy import bounded
from edgeslim.deploy.agent.disk import ensure_dir
from edgeslim.deploy.store import FleetKeys, ObjectStore, check_name

log = logging.getLogger("edgeslim.agent")

SUBDIRS = ("objects", "objects/sha256", "partial", "releases", "engines", "roots")


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """How an agent polls, downloads and health-checks (the ``edgeslim-agent`` flags of the same names).

    Attributes:
        poll_interval: seconds between polls of the device's manifest.
        heartbeat_interval: an idle agent re-publishes its status at least this often (seconds).
        max_backoff: the longest wait between polls while the store is unreachable (seconds).
        max_download_rate: cap downloads at this many bytes per second (None: no cap).
        health_timeout: seconds the health check may run.
        chunk_size: bytes per read of a download.
        health_in_process: run the health check in this process, for simulating many devices in
            one process (bench_fleet); a real device uses a child process (isolation, and a small
            idle agent).
        max_manifest_bytes: a larger manifest is refused unread.
    """

    poll_interval: float = 5.0
    heartbeat_interval: float = 30.0
    max_backoff: float = 300.0
    max_download_rate: float | None = None
    health_timeout: float = 120.0
    chunk_size: int = 1 << 16
    health_in_process: bool = False
    max_manifest_bytes: int = bounded.MAX_MANIFEST_BYTES


@dataclasses.dataclass
class AgentContext:
    """One device of one fleet, its state directory (made here) and the wall clock it reads.

    ``clock`` answers the device's own wall-clock time (statuses, decisions, expiry checks);
    tests of a device whose clock is wrong swap it.
    """

    store: ObjectStore
    fleet: str
    device_id: str
    device_class: str
    state_dir: Path
    settings: AgentSettings
    clock: Callable[[], float] = time.time
    keys: FleetKeys = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.keys = FleetKeys(self.fleet)  # checks the fleet's name
        self.device_id = check_name("device", self.device_id)
        self.state_dir = Path(self.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.check_layout()

    def check_layout(self) -> None:
        """Each directory the agent writes into is its own, not a link planted to send its writes
        (and removals) elsewhere: a link is removed and the directory made, one line each; a
        directory of another user's is refused (UnsafePath)."""
        mode = self.state_dir.stat().st_mode & 0o777
        if mode & 0o022:
            log.warning("state directory %s is writable by other users (mode %o): whoever can write it can plant "
                        "files the agent refuses; chmod go-w it", self.state_dir, mode)
        for sub in SUBDIRS:
            fixed = ensure_dir(self.state_dir / sub)
            if fixed:
                log.warning("%s", fixed)

    @property
    def current_link(self) -> Path:
        """``current``: the release the application loads."""
        return self.state_dir / "current"

    @property
    def previous_link(self) -> Path:
        """``previous``: the release before it, for rollback."""
        return self.state_dir / "previous"

    @property
    def journal_file(self) -> Path:
        """``swap.json``: exists only while a swap is undecided."""
        return self.state_dir / "swap.json"
