"""Release statements on MLflow model versions: what the release key signs after the gate.

The register step calls :func:`sign_version` right after it registers a gated model,
when a release key is configured (``$EDGESLIM_RELEASE_KEY``); ``edgeslim fleet
release models:/NAME/VERSION`` does the same by hand for a version registered
without one. Either way the statement is built from the version's own artifacts
(the sha256 of ``model.onnx`` and of every engine) and its recorded gate verdict,
and only a *passed* verdict is signed. The statement is stored as the model
version's ``edgeslim.release`` tag: anyone may read it, nobody without the
release key can make one that verifies.

MLflow is imported inside the functions: the device agent never imports this module.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from edgeslim.components.common.errors import ConfigError, SourceError
from edgeslim.components.common.hashing import file_sha256
from edgeslim.components.common.tracking import parse_model_uri
from edgeslim.deploy import signing, trust

log = logging.getLogger("edgeslim.release")
RELEASE_KEY_ENV = "EDGESLIM_RELEASE_KEY"


def statement_for_dir(model_dir: Path, *, name: str, version: str, run_id: str | None,
                      expires_s: float = trust.DEFAULT_RELEASE_EXPIRY_S) -> dict[str, Any]:
    """The release payload of a downloaded edge-model directory (model.onnx, engines/, edge_meta.json)."""
    onnx = model_dir / "model.onnx"
    if not onnx.exists():
        raise SourceError(f"models:/{name}/{version} has no model.onnx: only edge models get release statements")
    meta_path = model_dir / "edge_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    gate = meta.get("gate") or (meta.get("metadata") or {}).get("gate")
    if not isinstance(gate, dict):
        raise ConfigError(f"models:/{name}/{version} records no gate verdict: run it through `edgeslim run`, "
                          "whose gate decides what may be released")
    engines = {}
    edir = model_dir / "engines"
    if edir.is_dir():
        for cls_dir in sorted(p for p in edir.iterdir() if p.is_dir()):
            files = sorted(cls_dir.glob("*.engine")) + sorted(cls_dir.glob("*.plan"))
            if files:
                engines[cls_dir.name] = {"sha256": file_sha256(files[0]), "size": files[0].stat().st_size}
    return trust.release_payload(name=name, version=version, run_id=run_id,
                                 artifact={"sha256": file_sha256(onnx), "size": onnx.stat().st_size},
                                 engines=engines, gate=gate, expires_s=expires_s)


def sign_version(name: str, version: str, release_key, *, client=None,
                 expires_s: float = trust.DEFAULT_RELEASE_EXPIRY_S) -> dict[str, Any]:
    """Sign the release statement of a registered edge model version and tag the version with it."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = client or MlflowClient()
    mv = client.get_model_version(name, str(version))
    with tempfile.TemporaryDirectory(prefix="edgeslim-release-") as tmp:
        mdir = Path(download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        payload = statement_for_dir(mdir, name=name, version=str(version), run_id=mv.run_id, expires_s=expires_s)
    envelope = trust.sign_with(payload, [release_key])
    client.set_model_version_tag(name, str(version), trust.RELEASE_TAG,
                                 json.dumps(envelope, sort_keys=True, separators=(",", ":")))
    log.info("signed the release statement of %s version %s (key %s)", name, version,
             signing.key_id(release_key.public_key()))
    return envelope


def sign_uri(model_uri: str, release_key_path: str | None, **kw) -> dict[str, Any]:
    """``edgeslim fleet release``: resolve ``models:/NAME/VERSION`` (or ``@ALIAS``) and sign it."""
    from mlflow import MlflowClient

    path = release_key_path or os.environ.get(RELEASE_KEY_ENV)
    if not path:
        raise ConfigError(f"no release key: pass --release-key or set {RELEASE_KEY_ENV} "
                          "(make one with `edgeslim fleet keygen DIR --role release`)")
    name, alias, version = parse_model_uri(model_uri)
    client = MlflowClient()
    if alias:
        version = client.get_model_version_by_alias(name, alias).version
    return sign_version(name, str(version), signing.load_private_key(path), client=client, **kw)


def sign_if_configured(name: str, version: str, *, client=None) -> dict[str, Any] | None:
    """The register step's hook: sign when ``$EDGESLIM_RELEASE_KEY`` names a key, else say how."""
    path = os.environ.get(RELEASE_KEY_ENV)
    if not path:
        log.info("no %s: %s version %s has no release statement; fleets will not install it until "
                 "`edgeslim fleet release models:/%s/%s` signs it", RELEASE_KEY_ENV, name, version, name, version)
        return None
    return sign_version(name, version, signing.load_private_key(path), client=client)
