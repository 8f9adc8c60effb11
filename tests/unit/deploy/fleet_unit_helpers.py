"""Helpers of the fleet unit tests: tiny ONNX models, golden checks, uploads, manifests."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np


def make_onnx(path: Path, *, seed: int = 0, n_in: int = 4, n_out: int = 3, scale: float = 1.0) -> Path:
    """y = x @ W (a Gemm): small, valid, and each seed gives different outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_in, n_out)) * scale).astype(np.float32)
    b = np.zeros(n_out, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def golden_for(onnx_path: Path, *, n_in: int = 4, atol: float = 1e-4) -> dict:
    """A health check whose expected outputs come from running ``onnx_path``."""
    import onnxruntime as ort

    from edgeslim.deploy.manifest import encode_array

    x = np.random.default_rng(1).standard_normal((1, n_in)).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    return {"input": encode_array(x), "outputs": {"y": encode_array(y)}, "atol": atol, "rtol": 1e-4,
            "latency_budget_ms": None, "repeats": 2}


def upload(store, path: Path) -> dict:
    from edgeslim.deploy.manifest import artifact_key

    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store.put(artifact_key(sha), data)
    return {"key": artifact_key(sha), "sha256": sha, "size": len(data), "format": "onnx", "metadata": {}}


class ManifestWriter:
    """Plays the controller's part for agent tests: signs and stores manifests."""

    def __init__(self, store, kit, fleet="f", device="d0", device_class="cls-a"):
        """``kit``: a tests/fleet_trust.TrustKit (fleet key signs, release key covers the artifact)."""
        self.store, self.kit, self.fleet, self.device, self.device_class = store, kit, fleet, device, device_class
        self.key = kit.fleet_key
        self.seq = 0
        self.top = 0  # the highest sequence published: what the sequence statement names

    def manifest(self, artifact: dict | None, health: dict | None, *, seq=None, action="install",
                 expires_in=3600.0, device_class=None, rollout="r"):
        from edgeslim.deploy.manifest import Manifest
        from edgeslim.deploy.waves import manifest_artifact

        if seq is None:
            self.seq += 1
            seq = self.seq
        now = time.time()
        release = self.kit.release(artifact, expires_s=max(expires_in, 60.0) + 60) if artifact else None
        return Manifest(fleet=self.fleet, device_id=self.device, device_class=device_class or self.device_class,
                        rollout_id=rollout, sequence=seq, issued_at=now, expires_at=now + expires_in,
                        action=action, artifact=manifest_artifact(artifact) if artifact else None,
                        model={"name": "m", "version": "1"}, health_check=health, release=release)

    def publish(self, envelope: dict) -> str:
        """Store the manifest and, as the controller does, re-sign the fleet's sequence statement
        (the highest sequence this writer published)."""
        from edgeslim.deploy import trust
        from edgeslim.deploy.store import FleetKeys

        etag = self.store.put_json(FleetKeys(self.fleet).manifest(self.device), envelope)
        seq = envelope.get("signed", {}).get("sequence") if isinstance(envelope, dict) else None
        if isinstance(seq, int):
            self.top = max(seq, self.top)
        payload = trust.sequences_payload(fleet=self.fleet, version=time.time_ns(), root_version=1,
                                          sequences={self.device: self.top}, ttl_s=3600.0)
        self.store.put_json(FleetKeys(self.fleet).sequences, trust.sign_with(payload, [self.key]))
        return etag

    def send(self, artifact, health, **kw) -> dict:
        env = self.manifest(artifact, health, **kw).sign(self.key)
        self.publish(env)
        return env
