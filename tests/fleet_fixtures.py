"""Real parts on loopback for the fleet and security tests (a pytest plugin, see tests/conftest.py).

- Ceph RGW (a real S3 server) started and stopped by ``deploy/s3/rgw.sh``, the
  same script CI uses. Without the Debian packages the tests skip with the
  reason, except under ``CI=true``, where they fail.
- A real ``mlflow server`` (SQLite backend, local artifact root), with the webhook settings
  docs/registry-trigger.md gives for one machine, and its own copy of the CA bundle its webhook
  deliveries trust.
- Device agents as separate processes (``python -m edgeslim.deploy.agent.device``),
  each with its own state directory and device class.
- A TCP proxy between agents and RGW that can refuse or cut connections, to
  play S3 outages and broken downloads.
"""

from __future__ import annotations
import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path
import numpy as np
import pytest

from tests.conftest import running_mlflow_server
from tests.docs_blocks import doc_block
from tests.fleet_it_helpers import RGW_SH, free_port, wait_for, make_onnx, run_onnx, AgentProc, FlakyProxy, Publisher, release_is_complete  # noqa: F401


@pytest.fixture(scope="session")
def rgw(tmp_path_factory):
    """A Ceph RGW on loopback; yields its endpoint and credentials (env style)."""
    missing = [b for b in ("radosgw", "ceph-mon", "ceph-osd", "radosgw-admin") if not shutil.which(b)]
    if missing:
        msg = f"Ceph RGW not installed ({', '.join(missing)} missing); run deploy/s3/install-rgw.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    d = tmp_path_factory.mktemp("rgw")
    env = dict(os.environ, RGW_PORT=str(free_port()), MON_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(RGW_SH), "start", str(d)], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        subprocess.run(["bash", str(RGW_SH), "stop", str(d)], capture_output=True)
        pytest.fail(f"RGW did not start: {proc.stderr[-2000:]}")
    creds = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = creds["AWS_ACCESS_KEY_ID"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = creds["AWS_SECRET_ACCESS_KEY"]
    try:
        yield creds
    finally:
        subprocess.run(["bash", str(RGW_SH), "stop", str(d)], capture_output=True, timeout=600)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



@pytest.fixture
def s3_url(rgw):
    """A fresh bucket prefix per test: tests never see each other's fleets."""
    from edgeslim.deploy.store import open_store

    url = f"s3://fleet-tests/{uuid.uuid4().hex[:10]}"
    open_store(url, endpoint_url=rgw["S3_ENDPOINT_URL"], create_bucket=True)
    return url



@pytest.fixture
def s3_store(rgw, s3_url):
    from edgeslim.deploy.store import open_store

    return open_store(s3_url, endpoint_url=rgw["S3_ENDPOINT_URL"])



def documented_server_settings() -> dict[str, str]:
    """The ``MLFLOW_*`` variables that docs/registry-trigger.md tells a reader to set for ``mlflow server``
    on one machine, as its block leaves them (the block run in bash)."""
    text = doc_block("docs/registry-trigger.md", "mlflow-server-settings")
    out = subprocess.run(["bash", "-c", text + "\nenv -0"], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                         capture_output=True, text=True, timeout=60, check=True)
    env = dict(kv.split("=", 1) for kv in out.stdout.split("\0") if "=" in kv)
    return {k: v for k, v in env.items() if k.startswith("MLFLOW_")}


@pytest.fixture(scope="session")
def mlflow_server_certifi(tmp_path_factory) -> Path:
    """A folder on the fleet MLflow server's PYTHONPATH holding a copy of ``certifi``: the CA bundle its
    webhook deliveries verify against. A test adds a receiver's CA to it as the docs say (on this
    copy, with the same PYTHONPATH), never to the installed package."""
    import certifi

    d = tmp_path_factory.mktemp("mlflow-certifi")
    shutil.copytree(Path(certifi.__file__).parent, d / "certifi")
    return d


@pytest.fixture(scope="session")
def fleet_mlflow_server(tmp_path_factory, request, mlflow_server_certifi):
    """A real ``mlflow server`` that delivers webhooks, once per test process, started with the settings
    the docs give for one machine (http and loopback receivers, a 1 s webhook cache). Yields the URI."""
    env = dict(documented_server_settings(), PYTHONPATH=os.pathsep.join(
        p for p in (str(mlflow_server_certifi), os.environ.get("PYTHONPATH", "")) if p))
    # Every test with MLflow also uses RGW: start it while the server boots (2 cores, ~15 s each).
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow"), env=env,
                               while_booting=lambda: request.getfixturevalue("rgw")) as server:
        yield server.uri


@pytest.fixture
def fleet_mlflow(fleet_mlflow_server):
    """The webhook-delivering server as this test's MLflow: ``MLFLOW_TRACKING_URI`` and mlflow's tracking
    URI point at it for the test (tests/conftest.py restores both after it). Yields the URI."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = fleet_mlflow_server
    mlflow.set_tracking_uri(fleet_mlflow_server)
    yield fleet_mlflow_server



@pytest.fixture
def register_edge_model(fleet_mlflow, tmp_path, keys):
    """Log an ONNX with the edgeslim_edge flavor, register it, point ``alias`` at it.

    As the register step does after a passed gate, the release key signs the version's release
    statement (``release=False``: an ungated model, registered without one).
    """
    import mlflow
    from mlflow import MlflowClient

    from edgeslim.deploy.release import sign_version
    from edgeslim.plugins import edge_flavor

    def register(name: str, onnx_path: Path, alias: str = "edge-candidate", golden_from: Path | None = None,
                 release: bool = True):
        meta = {"gate": {"passed": True, "summary": "fleet test fixture"}} if release else {}
        if golden_from is not None:
            # Golden outputs recorded by the pipeline from a *different* (trusted) model.
            x = np.random.default_rng(7).standard_normal((1, 4)).astype(np.float32)
            meta["golden"] = {"input": x.tolist(), "outputs": {"y": run_onnx(golden_from, x).tolist()}}
        mlflow.set_experiment("fleet-tests")
        with mlflow.start_run():
            info = edge_flavor.log_model(onnx_path, "model", metadata=meta)
        mv = mlflow.register_model(info.model_uri, name)
        if release:
            sign_version(name, str(mv.version), keys.release_key)
        MlflowClient().set_registered_model_alias(name, alias, mv.version)
        return str(mv.version), hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()

    return register



@pytest.fixture
def keys(tmp_path):
    """The fleet "lab"'s root, release and fleet keys and its root.json (tests/fleet_trust.py)."""
    from tests.fleet_trust import TrustKit

    return TrustKit(tmp_path / "keys", fleet="lab")



@pytest.fixture
def agents(tmp_path, rgw, s3_url, s3_store, keys):
    """Factory of agent processes; all are stopped at the end of the test.

    A started agent is enrolled once it has registered (the operator's `edgeslim fleet enrol`),
    unless ``enrol=False``.
    """
    started: list[AgentProc] = []

    def make(device_id: str, device_class: str = "orin-sm87-jp6.1-trt10.3", *, fleet: str = "lab",
             endpoint: str | None = None, extra: list[str] | None = None, start: bool = True,
             enrol: bool = True) -> AgentProc:
        a = AgentProc(device_id=device_id, device_class=device_class, fleet=fleet, store_url=s3_url,
                      endpoint=endpoint or rgw["S3_ENDPOINT_URL"], root=keys.root_path,
                      state_dir=tmp_path / "devices" / device_id, extra=extra)
        started.append(a)
        if not start:
            return a
        a.start()
        if enrol and fleet == keys.fleet:
            c = keys.controller(s3_store)
            wait_for(lambda: device_id in c.registrations(), 60, f"{device_id} to register")
            c.enrol(device_id)
        return a

    yield make
    for a in started:
        a.stop()



@pytest.fixture
def proxy(rgw):
    port = int(rgw["S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    p = FlakyProxy(port)
    yield p
    p.close()



@pytest.fixture
def publisher(s3_store, keys):
    return Publisher(s3_store, keys)



@pytest.fixture
def local_fleet(tmp_path, keys):
    """The fleet "lab" on a local-directory store (no RGW): ``.store``, ``.publisher`` (plays the
    controller's manifest writes), ``.controller()`` (a real Controller over the store) and
    ``.agent(device_id, start=True)``, a factory of real agent processes stopped at the end."""
    from types import SimpleNamespace

    from edgeslim.deploy.store import LocalStore

    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    started: list[AgentProc] = []

    def agent(device_id: str, device_class: str = "orin-sm87-jp6.1-trt10.3", *, start: bool = True,
              root: Path | None = None) -> AgentProc:
        a = AgentProc(device_id=device_id, device_class=device_class, fleet=keys.fleet, store_url=str(store_dir),
                      endpoint="", root=root or keys.root_path, state_dir=tmp_path / "devices" / device_id)
        started.append(a)
        return a.start() if start else a

    yield SimpleNamespace(store=store, publisher=Publisher(store, keys), controller=lambda **kw: keys.controller(
        store, **kw), agent=agent, keys=keys)
    for a in started:
        a.stop()
