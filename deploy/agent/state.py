"""What the agent remembers between runs: ``agent.json`` and the replay floor.

``agent.json`` holds the last applied sequence, the manifest it committed, the last decision,
the last refusal and the newest fleet timestamp seen. The replay floor (the sequence below
which manifests are refused) is kept three times, so that losing ``agent.json`` never lets an
old manifest back in: in ``agent.json``, in ``sequence-floor`` (written first, on every
decision) and in the ``release.json`` of the release each sequence installed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from edgeslim.deploy.agent.context import AgentContext
from edgeslim.deploy.agent.disk import atomic_write_json, read_own
from edgeslim.deploy.agent.errors import UnsafePath

log = logging.getLogger("edgeslim.agent")


class LocalState:
    """``agent.json`` as a dict (:attr:`data`), loaded at start and saved after every decision."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.file = ctx.state_dir / "agent.json"
        self.floor_file = ctx.state_dir / "sequence-floor"
        self.data = self._load()
        self._restore_floor()

    def _load(self) -> dict[str, Any]:
        self._lost: str | None = None
        try:
            state = json.loads(read_own(self.file))
            if isinstance(state, dict) and isinstance(state.get("applied_sequence", 0), int):
                return state
            raise ValueError("not an agent state")
        except FileNotFoundError:
            self._lost = "is missing"
        except UnsafePath as exc:  # never believed: the next save replaces the link itself
            self._lost = "was refused"
            log.error("refused agent.json (%s); starting over from the sequence floor", exc)
        except (ValueError, OSError):
            # Only atomic renames write it, so this is disk damage: start clean but keep models.
            self._lost = "is unreadable"
            log.error("agent.json is unreadable; starting over from the sequence floor (models on disk are kept)")
        return {"applied_sequence": 0, "manifest": None, "last": None, "rejected": None}

    def _read_floor_file(self) -> dict[str, Any]:
        try:
            floor = json.loads(read_own(self.floor_file))
            return floor if isinstance(floor, dict) and isinstance(floor.get("sequence"), int) else {}
        except UnsafePath as exc:
            log.error("refused sequence-floor (%s)", exc)
            return {}
        except (OSError, ValueError):
            return {}

    def _release_floor(self) -> int:
        """The highest sequence recorded as installed by any release on disk."""
        best = 0
        for meta in (self.ctx.state_dir / "releases").glob("*/release.json"):
            if meta.parent.is_symlink():
                continue  # a planted link to a release elsewhere is no record of this device's
            try:
                seq = json.loads(read_own(meta)).get("sequence")
            except (OSError, ValueError, AttributeError, UnsafePath):
                continue
            if isinstance(seq, int):
                best = max(best, seq)
        return best

    def _restore_floor(self) -> None:
        """Replay protection survives losing agent.json: the floor is the highest of agent.json,
        ``sequence-floor`` (written before agent.json on every decision) and the sequence each
        release's release.json records as having installed it."""
        recorded = int(self.data.get("applied_sequence") or 0)
        floor = self._read_floor_file()
        floor_seq = int(floor.get("sequence") or 0)
        journal = self.ctx.journal_file
        if self._lost is None and floor_seq > recorded and journal.exists():
            try:
                pending = json.loads(read_own(journal)).get("sequence")
            except (OSError, ValueError, AttributeError, UnsafePath):
                pending = None
            if pending == floor_seq:
                # A crash between writing the floor and recording the decision: Installer.recover()
                # undoes that swap and the manifest is applied again, so the floor must let it through.
                floor_seq = recorded
                self.save()
        best = max(recorded, floor_seq, self._release_floor())
        if best > recorded:
            self.data["applied_sequence"] = best
            if floor_seq == best and floor.get("manifest_sha256"):
                self.data["manifest_sha256"] = floor["manifest_sha256"]
            log.warning("agent.json %s; recovered the sequence floor %d from sequence-floor and the releases "
                        "on disk: older manifests stay refused", self._lost or "is behind", best)
            self.save()

    def save(self) -> None:
        # The floor first, fsynced: whichever file survives a crash or a loss, replays stay refused.
        atomic_write_json(self.floor_file, {"sequence": self.data.get("applied_sequence", 0),
                                            "manifest_sha256": self.data.get("manifest_sha256")})
        atomic_write_json(self.file, self.data)
