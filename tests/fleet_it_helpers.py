"""Helpers of the fleet integration tests: agent processes, a flaky proxy, manifests, checks."""

from __future__ import annotations
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
import numpy as np

REPO = Path(__file__).resolve().parents[1]


RGW_SH = REPO / "deploy" / "s3" / "rgw.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# A wait's timeout only stops a hang: every wait gets at least this long, far above what any of them
# takes on a machine shared with CPU-bound jobs (the longest waits seen there took under a minute).
HANG_S = 300.0


def wait_for(cond, timeout: float, what: str, interval: float = 0.1):
    timeout = max(timeout, HANG_S)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")



def make_onnx(path: Path, *, seed: int = 0, n_in: int = 4, n_out: int = 3) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(n_out, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path



def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]



class AgentProc:
    """One device: a real ``python -m edgeslim.deploy.agent.device`` process."""

    def __init__(self, *, device_id: str, device_class: str, fleet: str, store_url: str, endpoint: str,
                 root: Path, state_dir: Path, extra: list[str] | None = None, env: dict | None = None):
        self.device_id, self.device_class, self.fleet = device_id, device_class, fleet
        self.state_dir = state_dir
        self.args = [sys.executable, "-m", "edgeslim.deploy.agent.device", "--store", store_url,
                     "--endpoint-url", endpoint, "--fleet", fleet, "--device-id", device_id,
                     "--device-class", device_class, "--state-dir", str(state_dir), "--root", str(root),
                     "--poll-interval", "0.2", "--heartbeat-interval", "1", "--max-backoff", "1",
                     "--health-timeout", "600"] + (extra or [])
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.log_path = state_dir.parent / f"{device_id}.log"
        self._reader: threading.Thread | None = None

    def start(self, *more: str) -> "AgentProc":
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args + list(more), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=self.env, start_new_session=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc):
        with open(self.log_path, "a") as fh:
            for line in proc.stderr:
                self.lines.append(line)
                fh.write(line)

    def saw(self, text: str, since: int = 0) -> bool:
        return any(text in line for line in self.lines[since:])

    def kill(self) -> None:
        """SIGKILL the agent and anything it started (a power cut, as far as it knows)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self._reader:
            self._reader.join(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._reader:
            self._reader.join(5)

    def running_sha(self) -> str | None:
        link = self.state_dir / "current"
        if not link.exists():
            return None
        return hashlib.sha256((link / "model.onnx").read_bytes()).hexdigest()

    def local_status(self) -> dict:
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}



class FlakyProxy:
    """A loopback TCP proxy that can refuse connections or cut them after N bytes."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.mode = "pass"
        self.cut_after = 0
        self.bytes_down = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._open: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str, cut_after: int = 0) -> None:
        self.mode, self.cut_after = mode, cut_after
        if mode != "pass":
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._open += [client, upstream]
            budget = [self.cut_after if self.mode == "cut" else None]
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, budget), daemon=True).start()

    def _pipe(self, src, dst, budget):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget is not None and budget[0] is not None:
                    if budget[0] <= 0:
                        break
                    data = data[: budget[0]]
                    budget[0] -= len(data)
                if budget is not None:
                    self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
                if s in self._open:
                    self._open.remove(s)

    def close(self):
        self._stop = True
        self._sock.close()
        self.set("refuse")



class Publisher:
    """Plays the controller for agent-level tests: uploads artifacts, signs and stores manifests."""

    def __init__(self, store, kit, fleet="lab"):
        """``kit``: tests/fleet_trust.TrustKit; its fleet key signs, its release key covers artifacts."""
        self.store, self.fleet, self.kit = store, fleet, kit
        self.key = kit.fleet_key
        self.sent: dict[str, int] = {}

    def upload(self, onnx_path: Path) -> dict:
        from edgeslim.deploy.manifest import artifact_key

        data = Path(onnx_path).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.store.put(artifact_key(sha), data)
        return {"key": artifact_key(sha), "sha256": sha, "size": len(data), "format": "onnx", "metadata": {}}

    @staticmethod
    def golden(onnx_path: Path, n_in: int = 4) -> dict:
        from edgeslim.deploy.manifest import encode_array

        x = np.random.default_rng(1).standard_normal((1, n_in)).astype(np.float32)
        return {"input": encode_array(x), "outputs": {"y": encode_array(run_onnx(onnx_path, x))},
                "atol": 1e-4, "rtol": 1e-4, "latency_budget_ms": None, "repeats": 2}

    def manifest(self, device: str, device_class: str, seq: int, artifact: dict, health: dict, *,
                 expires_in: float = 3600.0, key=None) -> dict:
        from edgeslim.deploy.manifest import Manifest
        from edgeslim.deploy.waves import manifest_artifact

        now = time.time()
        release = self.kit.release(artifact, name="m", version=str(seq), expires_s=max(expires_in, 60.0) + 60)
        m = Manifest(fleet=self.fleet, device_id=device, device_class=device_class, rollout_id=f"t{seq}",
                     sequence=seq, issued_at=now, expires_at=now + expires_in, action="install",
                     artifact=manifest_artifact(artifact), model={"name": "m", "version": str(seq)},
                     health_check=health, release=release)
        return m.sign(key or self.key)

    def publish(self, device: str, envelope: dict) -> str:
        """Store the manifest and, as the controller does, re-sign the fleet's sequence statement."""
        from edgeslim.deploy.store import FleetKeys

        etag = self.store.put_json(FleetKeys(self.fleet).manifest(device), envelope)
        seq = envelope["signed"].get("sequence") if isinstance(envelope.get("signed"), dict) else None
        if isinstance(seq, int):
            self.sent[device] = max(seq, self.sent.get(device, 0))
        self.sign_sequences()
        return etag

    def sign_sequences(self, ttl_s: float = 3600.0, key=None) -> dict:
        """The fleet's signed sequence statement: the highest sequence published to each device."""
        from edgeslim.deploy import trust
        from edgeslim.deploy.store import FleetKeys

        payload = trust.sequences_payload(fleet=self.fleet, version=time.time_ns(), root_version=1,
                                          sequences=self.sent, ttl_s=ttl_s)
        self.store.put_json(FleetKeys(self.fleet).sequences, trust.sign_with(payload, [key or self.key]))
        return payload

    def status(self, device: str) -> dict:
        from edgeslim.deploy.store import FleetKeys

        got = self.store.get_json(FleetKeys(self.fleet).status(device))
        return got[0]["signed"] if got else {}  # the device signs its status; tests read the payload



def release_is_complete(state_dir: Path, link: str, known: set[str]) -> str | None:
    """The sha the link points at, after checking it is a whole, verified, loadable model."""
    p = state_dir / link
    if not os.path.lexists(p):
        return None
    meta = json.loads((p / "release.json").read_text())
    data = (p / "model.onnx").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert sha == meta["sha256"] and len(data) == meta["size"], f"{link} is half-written"
    assert sha in known, f"{link} points at an unknown artifact"
    import onnxruntime as ort

    ort.InferenceSession(data, providers=["CPUExecutionProvider"])  # loads
    return sha



def mlflow_signed_headers(secret: str, body: bytes, delivery: str | None = None, ts: int | None = None) -> dict:
    """Headers of an MLflow webhook delivery: the v1 HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>``."""
    import base64
    import hmac

    delivery = delivery or str(uuid.uuid4())
    stamp = str(int(time.time()) if ts is None else ts)
    sig = hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": "v1," + base64.b64encode(sig).decode()}


def http_request(port: int, method: str, path: str = "/", body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 30.0) -> tuple[int, str]:
    """One HTTP request to a receiver on loopback: (status, body text)."""
    import http.client

    return _exchange(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), method, path, body, headers)


def _exchange(conn, method: str, path: str, body: bytes | None, headers: dict | None) -> tuple[int, str]:
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def self_signed_cert(folder: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                     name: str = "receiver") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``hosts``, and its key, as PEM files: (cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    alt = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def https_request(port: int, method: str, path: str = "/", body: bytes | None = None, headers: dict | None = None,
                  *, cafile: Path, host: str = "127.0.0.1", timeout: float = 30.0) -> tuple[int, str]:
    """One HTTPS request to a receiver on loopback, verifying its certificate against ``cafile``."""
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=str(cafile))
    return _exchange(http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx), method, path, body, headers)
