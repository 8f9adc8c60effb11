"""Release targets: what a manifest needs to install one model version, as this fleet signed it.

A target is made from the MLflow model version and checked against the release statement
that the register step signed at the gate: only the ONNX it covers, and the engines it lists,
are uploaded (content-addressed) and shipped. Targets are stored signed by the fleet key, so a
later rollback to an artifact can trust what installs it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgeslim.components.common.errors import FleetError, SourceError
from edgeslim.components.common.hashing import file_sha256
from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_trust import FleetTrust
from edgeslim.deploy.golden import golden_check
from edgeslim.deploy.manifest import artifact_key
from edgeslim.deploy.registry_sync import ModelRef, download_model, resolve_model
from edgeslim.deploy.rollout_config import WaveRolloutConfig
from edgeslim.deploy.store import PreconditionFailed, check_name

log = logging.getLogger("edgeslim.controller")


class ReleaseTargets(FleetPart):
    """Make, sign, store and read back release targets; ``prepare`` makes a rollout's first record."""

    def __init__(self, ctx: FleetContext, fleet_trust: FleetTrust) -> None:
        super().__init__(ctx)
        self.fleet_trust = fleet_trust
        # run_local only: signs a throw-away release statement for a version that has none.
        self.sign_missing_release: Callable[[Path, ModelRef], str] | None = None

    def prepare(self, name: str, model_uri: str, cfg: WaveRolloutConfig) -> dict[str, Any]:
        """Resolve the model, check its release statement, upload its artifacts, write a pending record."""
        check_name("rollout", name)
        ref = resolve_model(model_uri)
        target = self.prepare_target(ref, cfg)
        now = self.clock()
        return {
            "name": name, "fleet": self.fleet, "state": "pending", "generation": 1,
            "model": ref.to_dict(), "artifact": target["artifact"], "engines": target["engines"],
            "health_check": target["health_check"], "release": target["release"],
            "config": cfg.to_dict(), "waves": [], "devices": {}, "abort_requested": None,
            "reason": None, "created_at": now, "updated_at": now, "history": [],
        }

    def prepare_target(self, ref: ModelRef, cfg: WaveRolloutConfig) -> dict[str, Any]:
        """Everything a manifest needs to install ``ref``, checked against its release statement.

        Only what the release role signed is shipped: the ONNX must be the one it covers, and an
        engine goes to a device class only if the statement lists that exact engine.
        """
        with tempfile.TemporaryDirectory(prefix="edgeslim-rollout-") as tmp:
            mdir = download_model(ref, tmp)
            statement = ref.release or (self.sign_missing_release(mdir, ref) if self.sign_missing_release else None)
            if not statement:
                raise SourceError(f"{ref.uri} (version {ref.version}) carries no release statement (tag "
                                  f"{trust.RELEASE_TAG}): it was not registered through the gate with a release "
                                  f"key; sign it with `edgeslim fleet release models:/{ref.name}/{ref.version}`")
            try:
                rel = trust.verify_release(bounded.loads(statement, what="release statement"),
                                           self.fleet_trust.root, now=self.clock())
            except (signing.SignatureError, bounded.BoundedInputError) as exc:
                raise SourceError(f"{ref.uri}: {exc}") from None
            if (rel.name, rel.version) != (ref.name, ref.version):
                raise SourceError(f"{ref.uri}: its release statement is for {rel.name} version {rel.version}; "
                                  "copied from another version: sign this version's own with "
                                  f"`edgeslim fleet release models:/{ref.name}/{ref.version}`")
            onnx = mdir / "model.onnx"
            if (file_sha256(onnx), onnx.stat().st_size) != (rel.sha256, rel.size):
                raise SourceError(f"{ref.uri}: model.onnx is not the file its release statement covers "
                                  f"({rel.sha256[:12]}); it was changed after the gate")
            artifact = self._upload(onnx, "onnx")
            engines = {}
            edir = mdir / "engines"
            if edir.is_dir():
                for cls_dir in sorted(p for p in edir.iterdir() if p.is_dir()):
                    files = sorted(cls_dir.glob("*.engine")) + sorted(cls_dir.glob("*.plan"))
                    if not files:
                        continue
                    want = rel.engines.get(cls_dir.name)
                    if not want or want["sha256"] != file_sha256(files[0]):
                        log.warning("engine %s is not in the release statement: not shipped", cls_dir.name)
                        continue
                    meta_p = cls_dir / "metadata.json"
                    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
                    engines[cls_dir.name] = self._upload(files[0], "tensorrt", meta)
            health = golden_check(mdir, cfg)
        target = {"artifact": artifact, "engines": engines, "model": ref.to_dict(), "health_check": health,
                  "release": rel.envelope}
        return self.put_target(target)

    def put_target(self, target: dict[str, Any]) -> dict[str, Any]:
        """Sign and store what installs one artifact, so a later rollback to it can trust it."""
        self.fleet_trust.require_key()
        self.store.put_json(self.keys.target(target["artifact"]["sha256"]), self.fleet_trust.sign(target))
        return target

    def target(self, sha256: str) -> dict[str, Any] | None:
        """What installs artifact ``sha256`` (for a rollback to it), as this fleet signed it.

        A target signed by a fleet key that the root no longer lists (a rotation) is derived
        again from MLflow, through the release statement it names, and signed anew.
        """
        key = self.keys.target(sha256)
        try:
            got = self.fleet_trust.read(key, f"target {sha256[:12]}", bounded.MAX_MANIFEST_BYTES)
        except FleetError as exc:
            log.error("%s", exc)
            return None
        if got is None:
            return None
        try:
            tgt = self.fleet_trust.root.verify(got[0], "fleet", what=f"target {sha256[:12]}")
            if tgt.get("artifact", {}).get("sha256") == sha256:
                return tgt
        except signing.SignatureError:
            pass
        try:  # not (or no longer) ours: only its release statement can be believed
            rel = trust.verify_release(got[0]["signed"]["release"], self.fleet_trust.root, now=self.clock())
        except (signing.SignatureError, KeyError, TypeError) as exc:
            log.error("target %s: neither the fleet key nor a release statement vouches for it (%s)", sha256[:12], exc)
            return None
        if rel.sha256 != sha256:
            return None
        log.info("target %s: re-deriving from models:/%s/%s (its fleet signature is not current)",
                 sha256[:12], rel.name, rel.version)
        ref = resolve_model(f"models:/{rel.name}/{rel.version}")
        return self.prepare_target(ref, WaveRolloutConfig())

    def _upload(self, path: Path, fmt: str, metadata: dict | None = None) -> dict[str, Any]:
        sha, size = file_sha256(path), path.stat().st_size
        key = artifact_key(sha)
        head = self.store.head(key)
        if head is None or head[0] != size:
            try:
                self.store.put_file(key, path, if_none_match_any=head is None)
            except PreconditionFailed:
                pass  # uploaded concurrently: content-addressed, so it is the same bytes
        return {"key": key, "sha256": sha, "size": size, "format": fmt, "metadata": metadata or {}}
