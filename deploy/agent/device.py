"""The device agent: pull, verify, swap, health-check, commit or roll back.

Runs on each device (``edgeslim-agent`` or ``python -m edgeslim.deploy.agent.device``,
systemd unit in ``deploy/systemd/``). It imports no torch, mlflow or kfp; the
health check runs in a child process, so the idle agent holds only the store
client.

On disk, under ``--state-dir``::

    objects/sha256/<hex>      verified artifacts (content-addressed, read-only)
    partial/<hex>.part        downloads in progress (resumed with Range requests)
    releases/<name>/          model.onnx (+ model.engine) hard-linked from objects
    current -> releases/...   what the application loads; swapped with rename(2)
    previous -> releases/...  the one before, for rollback
    agent.json                last applied sequence and manifests (atomic writes)
    sequence-floor            the replay floor again, written before agent.json (survives losing it)
    swap.json                 the swap journal: exists only while a swap is undecided

Every step is either a rename or idempotent, so a SIGKILL anywhere leaves
``current`` on a complete, verified release; start-up undoes an undecided swap
(and the manifest is then applied again from the start).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from edgeslim.components.common.hashing import file_sha256
from edgeslim.components.common.errors import ConfigError, EdgeslimError, FleetError

from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.manifest import Artifact, Manifest, ManifestRejected, manifest_digest, verify_manifest
from edgeslim.deploy.store import (FleetKeys, NoSuchObject, NotModified, ObjectStore, StoreUnavailable, check_name,
                                   open_store)

log = logging.getLogger("edgeslim.agent")

AGENT_VERSION = 1
ENV_PREFIX = "EDGESLIM_AGENT_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write-then-rename, fsynced: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_symlink(target: str | None, link: Path) -> None:
    """Point ``link`` at ``target`` (relative) atomically; ``None`` removes it."""
    if target is None:
        try:
            link.unlink()
        except FileNotFoundError:
            pass
    else:
        tmp = link.with_name(f".{link.name}.new")
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, link)
    _fsync_dir(link.parent)


def read_link(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except (FileNotFoundError, OSError):
        return None


class ApplyFailed(FleetError):
    """This manifest cannot be applied here: its sequence is recorded as ``failed``, never retried."""


class IntegrityError(ApplyFailed):
    """A downloaded artifact does not match the manifest's sha256 or size."""


class ArtifactMissing(ApplyFailed):
    """The manifest's artifact is not in the store."""


class LocalDiskError(ApplyFailed):
    """The device's own disk refused a write (full, read-only, too large): the download is discarded."""


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _one_line(exc: BaseException, limit: int = 400) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


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


class Agent:
    """One device. ``run()`` loops forever; ``step()`` does one poll (for tests and --once)."""

    def __init__(self, *, store: ObjectStore, fleet: str, device_id: str, device_class: str,
                 state_dir: str | Path, root: "trust.Root", settings: AgentSettings = AgentSettings()) -> None:
        self.store, self.keys = store, FleetKeys(fleet)
        self.fleet, self.device_id = fleet, check_name("device", device_id)
        self.device_class = device_class
        self.state_dir = Path(state_dir).resolve()
        self.settings = settings
        for sub in ("objects/sha256", "partial", "releases", "engines"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.current_link = self.state_dir / "current"
        self.previous_link = self.state_dir / "previous"
        self.state_file = self.state_dir / "agent.json"
        self.floor_file = self.state_dir / "sequence-floor"
        self.journal_file = self.state_dir / "swap.json"
        self.state = self._load_state()
        self._restore_floor()
        self.applying_sha256: str | None = None  # manifest_digest of the signed payload being applied
        # The device's own identity: statuses and the registration are signed with it.
        self.device_key = trust.load_or_make_device_key(self.state_dir / "device.key")
        self.public_key = trust.public_b64(self.device_key)
        # The provisioned root, then every newer root this device accepted before (kept on disk).
        (self.state_dir / "roots").mkdir(exist_ok=True)
        try:
            self.root, _ = trust.update_root(root, self._local_root)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:  # disk damage: the store has them too
            log.error("a root kept in %s is unreadable (%s); starting from the provisioned root version %d",
                      self.state_dir / "roots", exc, root.version)
            self.root = root
        self.timestamp_etag: str | None = None
        self.metadata_error: str | None = None
        self._timestamp_seen = time.monotonic()  # when the kept timestamp was seen (this process: since start)
        self.manifest_etag: str | None = None
        self.failures = 0
        self.last_heartbeat = 0.0
        self.store_ok = True
        self.registered = False
        self._stop = False

    # ----------------------------------------------------------------- state on disk
    def _load_state(self) -> dict[str, Any]:
        self._state_lost: str | None = None
        try:
            state = json.loads(self.state_file.read_text())
            if isinstance(state, dict) and isinstance(state.get("applied_sequence", 0), int):
                return state
            raise ValueError("not an agent state")
        except FileNotFoundError:
            self._state_lost = "is missing"
        except (ValueError, OSError):
            # Only atomic renames write it, so this is disk damage: start clean but keep models.
            self._state_lost = "is unreadable"
            log.error("agent.json is unreadable; starting over from the sequence floor (models on disk are kept)")
        return {"applied_sequence": 0, "manifest": None, "last": None, "rejected": None}

    def _read_floor_file(self) -> dict[str, Any]:
        try:
            floor = json.loads(self.floor_file.read_text())
            return floor if isinstance(floor, dict) and isinstance(floor.get("sequence"), int) else {}
        except (OSError, ValueError):
            return {}

    def _release_floor(self) -> int:
        """The highest sequence recorded as installed by any release on disk."""
        best = 0
        for meta in (self.state_dir / "releases").glob("*/release.json"):
            try:
                seq = json.loads(meta.read_text()).get("sequence")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(seq, int):
                best = max(best, seq)
        return best

    def _restore_floor(self) -> None:
        """Replay protection survives losing agent.json: the floor is the highest of agent.json,
        ``sequence-floor`` (written before agent.json on every decision) and the sequence each
        release's release.json records as having installed it."""
        recorded = int(self.state.get("applied_sequence") or 0)
        floor = self._read_floor_file()
        floor_seq = int(floor.get("sequence") or 0)
        if self._state_lost is None and floor_seq > recorded and self.journal_file.exists():
            try:
                pending = json.loads(self.journal_file.read_text()).get("sequence")
            except (OSError, ValueError, AttributeError):
                pending = None
            if pending == floor_seq:
                # A crash between writing the floor and recording the decision: recover() undoes
                # that swap and the manifest is applied again, so the floor must let it through.
                floor_seq = recorded
                self._save_state()
        best = max(recorded, floor_seq, self._release_floor())
        if best > recorded:
            self.state["applied_sequence"] = best
            if floor_seq == best and floor.get("manifest_sha256"):
                self.state["manifest_sha256"] = floor["manifest_sha256"]
            log.warning("agent.json %s; recovered the sequence floor %d from sequence-floor and the releases "
                        "on disk: older manifests stay refused", self._state_lost or "is behind", best)
            self._save_state()

    def _save_state(self) -> None:
        # The floor first, fsynced: whichever file survives a crash or a loss, replays stay refused.
        atomic_write_json(self.floor_file, {"sequence": self.state.get("applied_sequence", 0),
                                            "manifest_sha256": self.state.get("manifest_sha256")})
        atomic_write_json(self.state_file, self.state)

    def recover(self) -> None:
        """Finish or undo a swap that a crash interrupted, and check ``current``."""
        for tmp in self.state_dir.glob(".*.new"):
            tmp.unlink(missing_ok=True)
        if self.journal_file.exists():
            try:
                j = json.loads(self.journal_file.read_text())
            except ValueError:
                j = None
            if not isinstance(j, dict) or not isinstance(j.get("sequence"), int) or \
                    not {"from", "to", "previous_before"} <= set(j):
                j = None
            if j is None:
                log.error("swap journal unreadable; keeping links as they are")
            elif self.state.get("applied_sequence", 0) >= j["sequence"]:
                # The decision was recorded before the crash: make the links match it.
                want = j["to"] if (self.state.get("last") or {}).get("result") == "committed" else j["from"]
                if read_link(self.current_link) != want:
                    atomic_symlink(want, self.current_link)
                log.info("recovered: swap to sequence %s was already decided", j["sequence"])
            else:
                # Undecided: undo, and the manifest will be applied again from the start.
                atomic_symlink(j["from"], self.current_link)
                atomic_symlink(j["previous_before"], self.previous_link)
                log.warning("recovered: undid a half-done swap to sequence %s; will retry it", j["sequence"])
            self.journal_file.unlink(missing_ok=True)
            _fsync_dir(self.state_dir)
        cur = read_link(self.current_link)
        if cur is not None and not self._release_ok(cur):
            prev = read_link(self.previous_link)
            log.error("current release %s is damaged; falling back to %s", cur, prev)
            atomic_symlink(prev if prev and self._release_ok(prev) else None, self.current_link)

    def _release_ok(self, rel: str) -> bool:
        """A release is usable if its model file is the object its name promises."""
        d = self.state_dir / rel
        meta_path = d / "release.json"
        try:
            meta = json.loads(meta_path.read_text())
            model = d / "model.onnx"
            return model.stat().st_size == meta["size"] and file_sha256(model) == meta["sha256"]
        except (FileNotFoundError, ValueError, KeyError, TypeError, OSError):
            return False

    # ----------------------------------------------------------------- trust
    def _local_root(self, version: int) -> Any:
        try:
            return bounded.loads((self.state_dir / "roots" / f"{version}.root.json").read_bytes(),
                                 what=f"local root version {version}")
        except FileNotFoundError:
            return None

    def _store_root(self, version: int) -> Any:
        blob = self.store.get(self.keys.root(version), max_bytes=bounded.MAX_SMALL_BYTES)
        return None if blob is None else bounded.loads(blob.data, what=f"root version {version}")

    def follow_root(self) -> None:
        """Accept newer roots from the store: each signed by the old root role and by its own."""
        try:
            self.root, accepted = trust.update_root(self.root, self._store_root)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            self.metadata_error = f"refused a new root: {exc}"
            log.error("%s", self.metadata_error)
            return
        for env in accepted:
            v = env["signed"]["version"]
            atomic_write_json(self.state_dir / "roots" / f"{v}.root.json", env)
            log.warning("accepted root version %d (keys rotated)", v)

    def follow_timestamp(self) -> None:
        """Read the fleet's signed timestamp: freshness of the metadata, and a floor for the clock."""
        try:
            blob = self.store.get(self.keys.timestamp, if_none_match=self.timestamp_etag,
                                  max_bytes=bounded.MAX_SMALL_BYTES)
        except NotModified:
            return
        if blob is None:
            return
        try:
            ts = trust.verify_timestamp(bounded.loads(blob.data, what="fleet timestamp"), self.root, fleet=self.fleet)
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            self.metadata_error = f"refused the fleet timestamp: {exc}"
            log.error("%s", self.metadata_error)
            self.timestamp_etag = blob.etag
            return
        known = self.state.get("timestamp") or {}
        self.timestamp_etag = blob.etag
        if int(ts["version"]) < int(known.get("version", 0)):
            self.metadata_error = (f"fleet timestamp version {ts['version']} is older than {known.get('version')}: "
                                   "replayed; kept the newer one")
            log.error("%s", self.metadata_error)
            return
        if int(ts["version"]) > int(known.get("version", 0)):
            self.state["timestamp"] = {k: ts[k] for k in ("version", "issued_at", "expires_at", "root_version")}
            self._save_state()
            self._timestamp_seen = time.monotonic()
        self.metadata_error = None

    def now(self) -> float:
        """This device's clock, never earlier than the newest signed timestamp it has seen plus the
        time that has passed since (by the monotonic clock): a device clock far behind, with no
        fresh timestamp coming, still sees manifests and the timestamp itself expire."""
        issued = float((self.state.get("timestamp") or {}).get("issued_at", 0.0))
        return max(time.time(), issued + (time.monotonic() - self._timestamp_seen) if issued else 0.0)

    def metadata_report(self) -> dict[str, Any]:
        """What the device knows of its metadata's freshness (goes into every status)."""
        ts = self.state.get("timestamp") or {}
        clock = time.time()
        issued = float(ts.get("issued_at", 0.0))
        return {"root_version": self.root.version, "timestamp_version": ts.get("version"),
                "stale": not ts or float(ts.get("expires_at", 0.0)) <= self.now(),
                "clock_behind_s": round(issued - clock, 1) if issued - clock > 60 else 0.0,
                "error": self.metadata_error}

    # ----------------------------------------------------------------- status
    def _status(self, state: str, **extra: Any) -> dict[str, Any]:
        cur = read_link(self.current_link)
        meta = {}
        if cur:
            try:
                meta = json.loads((self.state_dir / cur / "release.json").read_text())
            except (OSError, ValueError):
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
        st = {
            "device_id": self.device_id, "device_class": self.device_class, "fleet": self.fleet,
            "agent_version": AGENT_VERSION, "state": state, "heartbeat_at": time.time(),
            "applied_sequence": self.state.get("applied_sequence", 0),
            "rollout_id": (self.state.get("manifest") or {}).get("rollout_id"),
            "current": {"sha256": meta.get("sha256"), "backend": meta.get("backend"),
                        "fallback": meta.get("fallback"), "model": meta.get("model")} if cur else None,
            "last": self.state.get("last"), "rejected": self.state.get("rejected"),
            "metadata": self.metadata_report(),
        }
        st.update(extra)
        return st

    def publish_status(self, state: str = "idle", **extra: Any) -> None:
        st = self._status(state, **extra)
        try:
            atomic_write_json(self.state_dir / "status.json", st)
        except OSError as exc:  # a full disk: the store still hears what happened
            log.warning("could not write status.json (%s)", exc.strerror or exc)
        try:
            # Signed with the device's own key: nobody else can speak for this device.
            self.store.put_json(self.keys.status(self.device_id), trust.sign_with(st, [self.device_key]))
            self.last_heartbeat = time.time()
        except StoreUnavailable as exc:
            log.warning("could not publish status (%s); will retry", exc)

    def register(self) -> None:
        self.store.put_json(self.keys.registration(self.device_id), trust.sign_with({
            "device_id": self.device_id, "device_class": self.device_class, "fleet": self.fleet,
            "agent_version": AGENT_VERSION, "hostname": socket.gethostname(), "registered_at": time.time(),
            "public_key": self.public_key, "root_version": self.root.version,
        }, [self.device_key]))
        self.registered = True
        log.info("registered %s/%s (class %s) at %s; device key fingerprint %s (check it when you enrol it)",
                 self.fleet, self.device_id, self.device_class, self.store.describe(),
                 signing.key_id(self.device_key.public_key()))

    # ----------------------------------------------------------------- download
    def fetch(self, art: Artifact) -> Path:
        """Make sure the verified object is in the local store; download (with resume) if not."""
        obj = self.state_dir / "objects" / "sha256" / art.sha256
        if obj.exists():
            return obj
        part = self.state_dir / "partial" / f"{art.sha256}.part"
        try:
            return self._download(art, part, obj)
        except NoSuchObject:
            raise ArtifactMissing(f"artifact {art.key} is not in the store {self.store.describe()}: upload it "
                                  f"and send a new manifest (still serving the current model)") from None
        except OSError as exc:
            # The device's own disk refused: drop the partial file (it is what filled the disk).
            try:
                part.unlink(missing_ok=True)
            except OSError:
                pass
            raise self._disk_error(exc, art, f"downloading {art.sha256[:12]}") from None

    def _disk_error(self, exc: OSError, art: Artifact | None, doing: str) -> LocalDiskError:
        free = _free_bytes(self.state_dir)
        need = f"; the artifact is {art.size} bytes" if art is not None else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            msg = (f"no space left on device: free {free} bytes in {self.state_dir}{need} ({doing}); "
                   "free space on the device, then send a new manifest (still serving the current model)")
        else:
            msg = (f"cannot write to {self.state_dir} while {doing}: {exc.strerror or exc} "
                   f"(errno {errno.errorcode.get(exc.errno or 0, exc.errno)}; free {free} bytes{need}); fix the "
                   "device's disk, then send a new manifest (still serving the current model)")
        return LocalDiskError(msg)

    def _download(self, art: Artifact, part: Path, obj: Path) -> Path:
        have = part.stat().st_size if part.exists() else 0
        if have > art.size:
            part.unlink()
            have = 0
        if have:
            log.info("resuming download of %s at byte %d of %d", art.sha256[:12], have, art.size)
        else:
            log.info("downloading %s (%d bytes)", art.sha256[:12], art.size)
        if have < art.size:
            t0, got = time.monotonic(), 0
            with open(part, "ab") as fh:
                for chunk in self.store.stream(art.key, start=have, chunk_size=self.settings.chunk_size):
                    fh.write(chunk)
                    got += len(chunk)
                    if have + got > art.size:
                        break
                    if self.settings.max_download_rate:
                        # Bandwidth cap for metered links: sleep until we are back under the rate.
                        ahead = got / self.settings.max_download_rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                fh.flush()
                os.fsync(fh.fileno())
        size = part.stat().st_size
        digest = file_sha256(part)
        if size != art.size or digest != art.sha256:
            part.unlink(missing_ok=True)
            raise IntegrityError(
                f"artifact {art.key}: got {size} bytes with sha256 {digest[:12]}; manifest says "
                f"{art.size} bytes, {art.sha256[:12]} (discarded the download)"
            )
        os.chmod(part, 0o444)
        os.replace(part, obj)
        _fsync_dir(obj.parent)
        log.info("verified %s (%d bytes)", art.sha256[:12], art.size)
        return obj

    # ----------------------------------------------------------------- engines
    def _engine_for(self, m: Manifest, onnx_obj: Path) -> tuple[Path | None, str, str | None]:
        """The engine to ship in the release, the backend the device will use, and why not TensorRT
        when TensorRT is there but failed."""
        try:
            from edgeslim.components.engine.builder import build_engine
            from edgeslim.components.engine.tensorrt_calls import tensorrt_available
        except ImportError:
            return None, "onnxruntime", None
        ok, why = tensorrt_available()
        if not ok:
            # Serving the Q/DQ ONNX with ONNX Runtime is the documented fallback, not a failure.
            log.info("TensorRT unavailable (%s): serving the Q/DQ ONNX with ONNX Runtime", why.split(";")[0])
            return None, "onnxruntime", None
        if m.engine is not None:
            return self.fetch(m.engine), "tensorrt (prebuilt engine)", None
        out = self.state_dir / "engines" / m.artifact.sha256 / self.device_class
        built = sorted(out.glob("*.engine")) + sorted(out.glob("*.plan")) if out.exists() else []
        if built:
            return built[0], "tensorrt (engine built on device)", None
        log.info("no engine for class %s: building one from the Q/DQ ONNX", self.device_class)
        try:
            res = build_engine(str(onnx_obj), str(out), self.device_class)
        except Exception as exc:  # a failed build must not take the device down: ONNX Runtime still serves
            why = " ".join(f"TensorRT engine build failed: {exc}".split())[:500]
            log.error("%s; serving the Q/DQ ONNX with ONNX Runtime", why)
            return None, "onnxruntime", why
        return Path(res.engine_path), "tensorrt (engine built on device)", None

    def make_release(self, m: Manifest) -> str:
        """A release directory for the manifest's artifact; returns its path relative to state_dir."""
        onnx_obj = self.fetch(m.artifact)
        engine, backend, fallback = self._engine_for(m, onnx_obj)
        name = m.artifact.sha256[:20] + (f"-{file_sha256(engine)[:12]}" if engine else "")
        rel = f"releases/{name}"
        final = self.state_dir / rel
        if final.exists() and self._release_ok(rel):
            return rel
        tmp = self.state_dir / "releases" / f".{name}.tmp"
        try:
            self._build_release(m, onnx_obj, engine, backend, fallback, tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._disk_error(exc, m.artifact, f"making release {name}") from None
        return rel

    def _build_release(self, m: Manifest, onnx_obj: Path, engine: Path | None, backend: str,
                       fallback: str | None, tmp: Path, final: Path) -> None:
        if tmp.exists():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
        tmp.mkdir()
        os.link(onnx_obj, tmp / "model.onnx")
        if engine:
            os.link(engine, tmp / "model.engine")
        atomic_write_json(tmp / "release.json", {
            "sha256": m.artifact.sha256, "size": m.artifact.size, "backend": backend, "fallback": fallback,
            "model": m.model, "health_check": m.health_check,
        })
        if final.exists():  # a damaged leftover: replace it
            for p in final.iterdir():
                p.unlink()
            final.rmdir()
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    # ----------------------------------------------------------------- apply
    def apply(self, m: Manifest) -> dict[str, Any]:
        """Install (or roll back to) ``m``'s artifact: swap, health-check, commit or undo."""
        log.info("applying sequence %d (%s, rollout %s)", m.sequence, m.action, m.rollout_id)
        self.publish_status("downloading", target_sequence=m.sequence)
        new_rel = self.make_release(m) if m.artifact is not None else None
        old_cur, old_prev = read_link(self.current_link), read_link(self.previous_link)
        if new_rel == old_cur:
            # Already running this artifact (a rollback to what we still run, say): nothing to swap.
            return self._decide(m, "committed", None, health={"ok": True, "note": "already current"})
        atomic_write_json(self.journal_file, {"sequence": m.sequence, "from": old_cur, "to": new_rel,
                                              "previous_before": old_prev, "started_at": time.time()})
        log.info("swapping current to %s (sequence %d)", new_rel, m.sequence)
        if old_cur is not None:
            atomic_symlink(old_cur, self.previous_link)
        atomic_symlink(new_rel, self.current_link)
        if new_rel is None:
            return self._decide(m, "committed", None, health={"ok": True, "note": "withdrawn"})
        self.publish_status("checking", target_sequence=m.sequence)
        from edgeslim.deploy.agent.health import check_in_subprocess, run_health_check

        if self.settings.health_in_process:
            health = run_health_check(self.state_dir / new_rel, m.health_check)
        else:
            health = check_in_subprocess(self.state_dir / new_rel, m.health_check,
                                         timeout_s=self.settings.health_timeout)
        if health.get("ok"):
            if health.get("fallback"):  # TensorRT could not load the engine here: ONNX Runtime serves it
                meta_path = self.state_dir / new_rel / "release.json"
                atomic_write_json(meta_path, {**json.loads(meta_path.read_text()), "backend": "onnxruntime",
                                              "fallback": health["fallback"]})
            log.info("health check passed on %s (%.2f ms); committed sequence %d", health.get("backend"),
                     health.get("latency_ms") or 0, m.sequence)
            return self._decide(m, "committed", None, health=health)
        log.error("health check failed: %s; rolling back to %s", health.get("error"), old_cur)
        atomic_symlink(old_cur, self.current_link)
        atomic_symlink(old_prev, self.previous_link)
        return self._decide(m, "rolled_back", health.get("error"), health=health)

    def _decide(self, m: Manifest, result: str, reason: str | None, *, health: dict) -> dict[str, Any]:
        last = {"sequence": m.sequence, "rollout_id": m.rollout_id, "action": m.action, "result": result,
                "reason": reason, "health": health, "at": time.time(),
                "sha256": m.artifact.sha256 if m.artifact else None,
                "manifest_sha256": self.applying_sha256 or manifest_digest(m.to_dict())}
        self.state["applied_sequence"] = m.sequence
        self.state["manifest_sha256"] = last["manifest_sha256"]
        self.state["last"] = last
        if result == "committed":
            self.state["manifest"] = m.to_dict()
        # Record the decision first, then drop the journal: see recover().
        self._save_state()
        if result == "committed":
            self._note_installed(m.sequence)
        self.journal_file.unlink(missing_ok=True)
        _fsync_dir(self.state_dir)
        return last

    def _note_installed(self, sequence: int) -> None:
        """The third copy of the sequence floor: current's release.json names the sequence that installed it."""
        cur = read_link(self.current_link)
        if cur is None:
            return
        meta_path = self.state_dir / cur / "release.json"
        try:
            meta = json.loads(meta_path.read_text())
            if sequence > int(meta.get("sequence") or 0):
                atomic_write_json(meta_path, {**meta, "sequence": sequence})
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("could not record sequence %d in %s (%s)", sequence, meta_path, exc)

    def _refuse(self, reason: str, message: str, etag: str | None) -> str:
        """Record a refused manifest (status ``rejected``) and poll past it; the current model keeps serving."""
        log.error("refused manifest: %s", message)
        self.state["rejected"] = {"reason": reason, "message": message, "etag": etag, "at": time.time()}
        self._save_state()
        self.manifest_etag = etag
        self.publish_status("idle")
        return "rejected"

    def _fail(self, m: Manifest, reason: str, etag: str | None) -> str:
        """Mark ``m``'s sequence failed (it is not retried: the controller sends a new one)."""
        digest = self.applying_sha256 or manifest_digest(m.to_dict())
        self.state["last"] = {"sequence": m.sequence, "rollout_id": m.rollout_id, "action": m.action,
                              "result": "failed", "reason": reason, "at": time.time(),
                              "sha256": m.artifact.sha256 if m.artifact else None, "manifest_sha256": digest}
        self.state["applied_sequence"] = m.sequence
        self.state["manifest_sha256"] = digest
        self._save_state()
        self.manifest_etag = etag
        self.publish_status("idle")
        return "failed"

    # ----------------------------------------------------------------- poll loop
    def step(self) -> str:
        """One poll: returns what happened (``unchanged``, ``none``, ``applied``, ``rejected``...)."""
        if not self.registered:
            self.register()
        self.follow_root()
        self.follow_timestamp()
        try:
            blob = self.store.get(self.keys.manifest(self.device_id), if_none_match=self.manifest_etag,
                                  max_bytes=self.settings.max_manifest_bytes)
        except NotModified:
            return "unchanged"
        except bounded.BoundedInputError as exc:  # over the cap: refused from its size, never read
            return self._refuse(exc.reason, str(exc), getattr(exc, "etag", None))
        if blob is None:
            return "none"
        try:
            envelope = bounded.loads(blob.data, what="manifest", max_bytes=self.settings.max_manifest_bytes)
        except bounded.BoundedInputError as exc:  # a nesting bomb, or not JSON
            return self._refuse(exc.reason, str(exc), blob.etag)
        try:
            m = verify_manifest(envelope, self.root, fleet=self.fleet, device_id=self.device_id,
                                device_class=self.device_class,
                                last_sequence=self.state.get("applied_sequence", 0), now=self.now())
        except ManifestRejected as exc:
            signed = envelope.get("signed") if isinstance(envelope, dict) else None
            if exc.reason == "replay" and isinstance(signed, dict) and \
                    signed.get("sequence") == self.state.get("applied_sequence"):
                known, got = self.state.get("manifest_sha256"), manifest_digest(signed)
                if known is None or known == got:
                    self.manifest_etag = blob.etag  # the manifest we already applied: nothing to do
                    return "unchanged"
                exc = ManifestRejected(
                    "equivocation", f"manifest sequence {signed['sequence']} was already applied with other "
                                    f"content (payload sha256 {known[:12]}, this one {got[:12]}): two different "
                                    "signed manifests under one sequence; the signing key may be misused")
            return self._refuse(exc.reason, str(exc), blob.etag)
        self.applying_sha256 = manifest_digest(envelope["signed"])
        try:
            last = self.apply(m)
        except ApplyFailed as exc:
            log.error("%s", exc)
            return self._fail(m, str(exc), blob.etag)
        finally:
            self.applying_sha256 = None
        self.manifest_etag = blob.etag
        self.publish_status("idle")
        return "applied" if last["result"] == "committed" else last["result"]

    def _after_error(self, exc: Exception, delay: float) -> None:
        """Undo a swap the failed poll left undecided, and say what happened (best effort)."""
        try:
            self.recover()
        except Exception as rexc:
            log.error("recovery after the failed poll failed too (%s)", _one_line(rexc))
        try:
            self.publish_status("idle", error=f"{type(exc).__name__}: {_one_line(exc)}",
                                retry_in_s=round(delay, 2))
        except Exception as pexc:
            log.warning("could not publish status (%s)", _one_line(pexc))

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self, *, once: bool = False) -> int:
        """Poll until stopped (SIGTERM) or, with ``once``, until one poll succeeded."""
        try:
            self.recover()
        except Exception as exc:  # damaged local state: report it, keep polling (the next manifest may fix it)
            log.error("start-up recovery failed (%s: %s); polling anyway", type(exc).__name__, _one_line(exc))
            log.debug("traceback of the failed recovery", exc_info=True)
        backoff = self.settings.poll_interval
        while not self._stop:
            try:
                what = self.step()
                if not self.store_ok:
                    log.info("store reachable again")
                self.store_ok, self.failures, backoff = True, 0, self.settings.poll_interval
                if what in ("unchanged", "none") and \
                        time.time() - self.last_heartbeat >= self.settings.heartbeat_interval:
                    self.publish_status("idle")
                if once:
                    return 0
                delay = self.settings.poll_interval
            except StoreUnavailable as exc:
                self.failures += 1
                self.store_ok = False
                # Exponential backoff with jitter; the current model keeps serving meanwhile.
                backoff = min(self.settings.max_backoff, backoff * 2)
                delay = backoff * random.uniform(0.5, 1.0)
                cur = read_link(self.current_link)
                log.warning("store unreachable (%s); still serving %s; retry %d in %.2fs", exc, cur or "nothing",
                            self.failures, delay)
                try:
                    atomic_write_json(self.state_dir / "status.json",
                                      self._status("offline", store_error=str(exc), retry_in_s=round(delay, 2)))
                except OSError as werr:
                    log.warning("could not write status.json (%s)", werr.strerror or werr)
                if once:
                    return 1
            except Exception as exc:  # a bug or a hostile input in one poll must not take the device down
                self.failures += 1
                backoff = min(self.settings.max_backoff, backoff * 2)
                delay = backoff * random.uniform(0.5, 1.0)
                log.error("poll failed (%s: %s); still serving %s; retry %d in %.2fs", type(exc).__name__,
                          _one_line(exc), read_link(self.current_link) or "nothing", self.failures, delay)
                log.debug("traceback of the failed poll", exc_info=True)
                self._after_error(exc, delay)
                if once:
                    return 1
            deadline = time.monotonic() + delay
            while not self._stop and time.monotonic() < deadline:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        log.info("stopped")
        return 0


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeslim-agent",
        description="edgeslim device agent: pulls signed manifests, installs verified models, "
                    "health-checks them and rolls back on its own. Every option can also be set "
                    "as EDGESLIM_AGENT_<OPTION> (e.g. EDGESLIM_AGENT_DEVICE_ID). S3 credentials "
                    "come from the usual AWS environment variables or profile.",
    )
    p.add_argument("--store", default=_env("store") or os.environ.get("EDGESLIM_FLEET_STORE"),
                   help="s3://bucket/prefix or a directory")
    p.add_argument("--endpoint-url", default=_env("endpoint_url") or os.environ.get("EDGESLIM_S3_ENDPOINT_URL"),
                   help="S3 endpoint for S3-compatible servers")
    p.add_argument("--fleet", default=_env("fleet"))
    p.add_argument("--device-id", default=_env("device_id") or socket.gethostname())
    p.add_argument("--device-class", default=_env("device_class"),
                   help="exact device class key, e.g. orin-sm87-jp6.1-trt10.3")
    p.add_argument("--state-dir", default=_env("state_dir", "/var/lib/edgeslim-agent"))
    p.add_argument("--root", default=_env("root"),
                   help="the fleet's root document (root.json from `edgeslim fleet root-init`), installed at "
                        "provisioning; newer roots signed by it are followed from the store")
    p.add_argument("--poll-interval", type=float, default=float(_env("poll_interval", 5.0)))
    p.add_argument("--heartbeat-interval", type=float, default=float(_env("heartbeat_interval", 30.0)))
    p.add_argument("--max-backoff", type=float, default=float(_env("max_backoff", 300.0)))
    p.add_argument("--max-download-rate", type=float, default=float(_env("max_download_rate", 0)) or None,
                   help="cap downloads at this many bytes per second (metered links)")
    p.add_argument("--health-timeout", type=float, default=float(_env("health_timeout", 120.0)))
    p.add_argument("--max-manifest-bytes", type=int,
                   default=int(_env("max_manifest_bytes", bounded.MAX_MANIFEST_BYTES)),
                   help="refuse a manifest over this size unread (default %(default)s)")
    p.add_argument("--once", action="store_true", help="poll once, apply what is there, exit")
    p.add_argument("--log-level", default=_env("log_level", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``edgeslim-agent``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format=f"%(asctime)s edgeslim-agent[{args.device_id}] %(levelname)s %(message)s")
    # botocore logs request headers (signatures) at DEBUG: never let that reach our log. (Without boto3 the
    # store uses edgeslim's own S3 client, which logs no headers; quieting absent loggers costs nothing.)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        for name in ("fleet", "device_class", "store", "root"):
            if not getattr(args, name):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} is required (or set {ENV_PREFIX}{name.upper()})")
        store = open_store(args.store, endpoint_url=args.endpoint_url, timeout_s=5.0)
        if getattr(store, "client", None):
            log.info("S3 through %s", "boto3" if store.client == "boto3" else "edgeslim's own S3 client")
        agent = Agent(
            store=store,
            fleet=args.fleet, device_id=args.device_id, device_class=args.device_class,
            state_dir=args.state_dir, root=trust.load_root(args.root)[0],
            settings=AgentSettings(poll_interval=args.poll_interval, heartbeat_interval=args.heartbeat_interval,
                                   max_backoff=args.max_backoff, max_download_rate=args.max_download_rate,
                                   health_timeout=args.health_timeout, max_manifest_bytes=args.max_manifest_bytes),
        )
        signal.signal(signal.SIGTERM, agent.stop)
        signal.signal(signal.SIGINT, agent.stop)
        return agent.run(once=args.once)
    except EdgeslimError as exc:
        print(f"edgeslim-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
