"""Releases on the device's disk and the switch between them: swap, health-check, commit or roll back.

A release directory (``releases/<name>/``) holds ``model.onnx`` (and ``model.engine`` where
TensorRT is there), hard-linked from the verified objects, and ``release.json``. ``current``
and ``previous`` point at releases and are swapped with rename(2); ``swap.json`` journals a
swap until it is decided, so :meth:`Installer.recover` can finish or undo one that a crash
interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from edgeslim.components.common.hashing import file_sha256
from edgeslim.deploy.agent.context import AgentContext
from edgeslim.deploy.agent.disk import (atomic_symlink, atomic_write_json, check_owned, disk_error, fsync_dir,
                                        own_sha256, read_link, read_own, remove_path)
from edgeslim.deploy.agent.errors import IntegrityError, UnsafePath
from edgeslim.deploy.agent.fetch import ArtifactFetcher
from edgeslim.deploy.agent.report import Reporter
from edgeslim.deploy.agent.state import LocalState
from edgeslim.deploy.manifest import Manifest

log = logging.getLogger("edgeslim.agent")

_RELEASE = re.compile(r"^releases/[0-9a-f]{20}(-[0-9a-f]{12})?$")  # what current and previous may name


class Installer:
    """Installs (or rolls back to) a manifest's artifact, and keeps ``current`` on a verified release.

    Args:
        ctx: the device and its store.
        local: the agent's state on disk (every decision is recorded there).
        fetcher: where artifacts and prebuilt engines come from.
        reporter: publishes the ``downloading`` and ``checking`` statuses on the way.
    """

    def __init__(self, ctx: AgentContext, local: LocalState, fetcher: ArtifactFetcher, reporter: Reporter) -> None:
        self.ctx, self.local, self.fetcher, self.reporter = ctx, local, fetcher, reporter

    # ----------------------------------------------------------------- recovery
    def recover(self) -> None:
        """Finish or undo a swap that a crash interrupted, and check ``current``."""
        ctx, state = self.ctx, self.local.data
        self.clear_stale()
        if os.path.lexists(ctx.journal_file):
            try:
                j = json.loads(read_own(ctx.journal_file))
            except (ValueError, OSError) as exc:
                j = None
                if isinstance(exc, UnsafePath):
                    log.error("refused the swap journal (%s)", exc)
            if not isinstance(j, dict) or not isinstance(j.get("sequence"), int) or \
                    not {"from", "to", "previous_before"} <= set(j) or \
                    not all(j[k] is None or _RELEASE.match(str(j[k])) for k in ("from", "to", "previous_before")):
                j = None  # a journal names only releases of the agent's own
            if j is None:
                log.error("swap journal unreadable; keeping links as they are")
            elif state.get("applied_sequence", 0) >= j["sequence"]:
                # The decision was recorded before the crash: make the links match it.
                want = j["to"] if (state.get("last") or {}).get("result") == "committed" else j["from"]
                if read_link(ctx.current_link) != want:
                    atomic_symlink(want, ctx.current_link)
                log.info("recovered: swap to sequence %s was already decided", j["sequence"])
            else:
                # Undecided: undo, and the manifest will be applied again from the start.
                atomic_symlink(j["from"], ctx.current_link)
                atomic_symlink(j["previous_before"], ctx.previous_link)
                log.warning("recovered: undid a half-done swap to sequence %s; will retry it", j["sequence"])
            remove_path(ctx.journal_file)
            fsync_dir(ctx.state_dir)
        for link in (ctx.current_link, ctx.previous_link):
            if os.path.lexists(link) and not os.path.islink(link):
                log.error("%s is not a link the agent made: removed it", link)
                remove_path(link)
        cur = read_link(ctx.current_link)
        if cur is not None and not self._release_ok(cur):
            prev = read_link(ctx.previous_link)
            log.error("current release %s is damaged or not the agent's; falling back to %s", cur, prev)
            atomic_symlink(prev if prev and self._release_ok(prev) else None, ctx.current_link)

    def clear_stale(self) -> None:
        """Remove temporary paths a crash (or someone else) left: ``.<name>.new`` and ``.<name>.tmp`` in
        the state directory, its releases and its roots. Each is removed as it stands, a link as a link
        and a directory with its tree: none can block a swap or redirect a write."""
        d = self.ctx.state_dir
        for parent, pattern in ((d, ".*.new"), (d, ".*.tmp"), (d / "releases", ".*.tmp"), (d / "roots", ".*.tmp")):
            for tmp in parent.glob(pattern):
                if os.path.islink(tmp) or tmp.is_dir():
                    log.warning("removed %s, a %s left in the agent's temporary path", tmp,
                                "symbolic link" if os.path.islink(tmp) else "directory")
                remove_path(tmp)

    def _release_ok(self, rel: str, sha256: str | None = None) -> bool:
        """A release is usable if it is a directory of the agent's own under ``releases/`` whose model
        file is the object its release.json (and, when given, ``sha256``) names."""
        if not _RELEASE.match(rel):
            return False
        d = self.ctx.state_dir / rel
        try:
            if os.path.islink(d) or not d.is_dir():
                return False
            meta = json.loads(read_own(d / "release.json"))
            want = sha256 or meta["sha256"]
            return meta["sha256"] == want and own_sha256(d / "model.onnx") == want
        except (ValueError, KeyError, TypeError, OSError):
            return False

    # ----------------------------------------------------------------- releases
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
            return self.fetcher.fetch(m.engine), "tensorrt (prebuilt engine)", None
        device_class = self.ctx.device_class
        out = self.ctx.state_dir / "engines" / m.artifact.sha256 / device_class
        built = sorted(out.glob("*.engine")) + sorted(out.glob("*.plan")) if out.exists() else []
        built = [e for e in built if self._own_file(e)]
        if built:
            return built[0], "tensorrt (engine built on device)", None
        log.info("no engine for class %s: building one from the Q/DQ ONNX", device_class)
        try:
            res = build_engine(str(onnx_obj), str(out), device_class)
        except Exception as exc:  # a failed build must not take the device down: ONNX Runtime still serves
            why = " ".join(f"TensorRT engine build failed: {exc}".split())[:500]
            log.error("%s; serving the Q/DQ ONNX with ONNX Runtime", why)
            return None, "onnxruntime", why
        return Path(res.engine_path), "tensorrt (engine built on device)", None

    @staticmethod
    def _own_file(path: Path) -> bool:
        """Whether ``path`` is a regular file of the agent's own (an engine planted as a link, or by
        another user, is never shipped: a fresh one is built)."""
        try:
            check_owned(path, os.lstat(path))
            return True
        except (OSError, UnsafePath) as exc:
            log.warning("engine %s refused (%s)", path, exc)
            return False

    def make_release(self, m: Manifest) -> str:
        """A release directory for the manifest's artifact; returns its path relative to state_dir."""
        onnx_obj = self.fetcher.fetch(m.artifact)
        engine, backend, fallback = self._engine_for(m, onnx_obj)
        name = m.artifact.sha256[:20] + (f"-{file_sha256(engine)[:12]}" if engine else "")
        rel = f"releases/{name}"
        final = self.ctx.state_dir / rel
        if self._release_ok(rel, m.artifact.sha256):
            return rel
        tmp = self.ctx.state_dir / "releases" / f".{name}.tmp"
        try:
            self._build_release(m, onnx_obj, engine, backend, fallback, tmp, final)
        except UnsafePath:
            remove_path(tmp)
            raise
        except OSError as exc:
            try:
                remove_path(tmp)
            except OSError:
                pass
            raise disk_error(exc, self.ctx.state_dir, m.artifact, f"making release {name}") from None
        return rel

    def _build_release(self, m: Manifest, onnx_obj: Path, engine: Path | None, backend: str,
                       fallback: str | None, tmp: Path, final: Path) -> None:
        remove_path(tmp)  # a leftover, or a link planted there: removed as it stands, never followed
        tmp.mkdir()
        os.link(onnx_obj, tmp / "model.onnx", follow_symlinks=False)
        # What is installed is hashed now, where it will be loaded from: not a name's promise.
        got = own_sha256(tmp / "model.onnx")
        if got != m.artifact.sha256:
            remove_path(onnx_obj)
            raise IntegrityError(f"object {m.artifact.sha256[:12]} on the device's disk hashes to {got[:12]}: "
                                 "planted or damaged; removed it (the next manifest downloads it again)")
        if engine:
            os.link(engine, tmp / "model.engine", follow_symlinks=False)
        atomic_write_json(tmp / "release.json", {
            "sha256": m.artifact.sha256, "size": m.artifact.size, "backend": backend, "fallback": fallback,
            "model": m.model, "health_check": m.health_check,
        })
        remove_path(final)  # a damaged leftover, or a planted link: replaced, never followed
        os.replace(tmp, final)
        fsync_dir(final.parent)

    # ----------------------------------------------------------------- apply
    def apply(self, m: Manifest, digest: str) -> dict[str, Any]:
        """Install (or roll back to) ``m``'s artifact: swap, health-check, commit or undo.

        ``digest`` is the sha256 of the manifest's signed payload, recorded with the decision.
        Returns the decision (``last`` in ``agent.json``).
        """
        ctx = self.ctx
        log.info("applying sequence %d (%s, rollout %s)", m.sequence, m.action, m.rollout_id)
        self.reporter.publish("downloading", target_sequence=m.sequence)
        new_rel = self.make_release(m) if m.artifact is not None else None
        old_cur, old_prev = read_link(ctx.current_link), read_link(ctx.previous_link)
        if new_rel == old_cur:
            # Already running this artifact (a rollback to what we still run, say): nothing to swap.
            return self._decide(m, digest, "committed", None, health={"ok": True, "note": "already current"})
        atomic_write_json(ctx.journal_file, {"sequence": m.sequence, "from": old_cur, "to": new_rel,
                                             "previous_before": old_prev, "started_at": ctx.clock()})
        log.info("swapping current to %s (sequence %d)", new_rel, m.sequence)
        if old_cur is not None:
            atomic_symlink(old_cur, ctx.previous_link)
        atomic_symlink(new_rel, ctx.current_link)
        if new_rel is None:
            return self._decide(m, digest, "committed", None, health={"ok": True, "note": "withdrawn"})
        self.reporter.publish("checking", target_sequence=m.sequence)
        from edgeslim.deploy.agent.health import check_in_subprocess, run_health_check

        if ctx.settings.health_in_process:
            health = run_health_check(ctx.state_dir / new_rel, m.health_check)
        else:
            health = check_in_subprocess(ctx.state_dir / new_rel, m.health_check,
                                         timeout_s=ctx.settings.health_timeout)
        if health.get("ok"):
            if health.get("fallback"):  # TensorRT could not load the engine here: ONNX Runtime serves it
                meta_path = ctx.state_dir / new_rel / "release.json"
                atomic_write_json(meta_path, {**json.loads(read_own(meta_path)), "backend": "onnxruntime",
                                              "fallback": health["fallback"]})
            log.info("health check passed on %s (%.2f ms); committed sequence %d", health.get("backend"),
                     health.get("latency_ms") or 0, m.sequence)
            return self._decide(m, digest, "committed", None, health=health)
        log.error("health check failed: %s; rolling back to %s", health.get("error"), old_cur)
        atomic_symlink(old_cur, ctx.current_link)
        atomic_symlink(old_prev, ctx.previous_link)
        return self._decide(m, digest, "rolled_back", health.get("error"), health=health)

    def _decide(self, m: Manifest, digest: str, result: str, reason: str | None, *,
                health: dict) -> dict[str, Any]:
        state = self.local.data
        last = {"sequence": m.sequence, "rollout_id": m.rollout_id, "action": m.action, "result": result,
                "reason": reason, "health": health, "at": self.ctx.clock(),
                "sha256": m.artifact.sha256 if m.artifact else None, "manifest_sha256": digest}
        state["applied_sequence"] = m.sequence
        state["manifest_sha256"] = digest
        state["last"] = last
        if result == "committed":
            state["manifest"] = m.to_dict()
        # Record the decision first, then drop the journal: see recover().
        self.local.save()
        if result == "committed":
            self._note_installed(m.sequence)
        self.ctx.journal_file.unlink(missing_ok=True)
        fsync_dir(self.ctx.state_dir)
        return last

    def _note_installed(self, sequence: int) -> None:
        """The third copy of the sequence floor: current's release.json names the sequence that installed it."""
        cur = read_link(self.ctx.current_link)
        if cur is None:
            return
        meta_path = self.ctx.state_dir / cur / "release.json"
        try:
            meta = json.loads(read_own(meta_path))
            if sequence > int(meta.get("sequence") or 0):
                atomic_write_json(meta_path, {**meta, "sequence": sequence})
        except (OSError, ValueError, AttributeError, TypeError, UnsafePath) as exc:
            log.warning("could not record sequence %d in %s (%s)", sequence, meta_path, exc)
