"""Fleet benchmark: rollout convergence for N simulated devices, agent idle memory and import time.

    python -m edgeslim.pipelines.bench_fleet --devices 100            # starts a loopback RGW itself
    python -m edgeslim.pipelines.bench_fleet --store s3://b/p --endpoint-url http://127.0.0.1:7480

Convergence: N agents run as threads of this process (each with its own state
directory and store polls; health checks in-process), a real MLflow registry on
SQLite, and a real controller; the clock runs from ``create`` (alias
resolution, upload, waves) until every device has committed. The devices share
this machine's cores, which real devices do not, so this is an upper bound for
the control plane.

Idle memory and import time are measured on a real ``python -m edgeslim.deploy.agent.device``
process with a model installed, after it has gone idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_S3 = Path(__file__).resolve().parents[1] / "deploy" / "s3" / "rgw.sh"  # pipelines/ sits beside deploy/


def _tiny_onnx(path: Path, n_in: int = 64, n_out: int = 10) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((n_in, n_out)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"])], "bench",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(n_out, np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start_rgw(work: Path) -> dict[str, str]:
    env = dict(os.environ, RGW_PORT=_free_port(), MON_PORT=_free_port())
    out = subprocess.run(["bash", str(REPO_S3), "start", str(work / "rgw")], env=env, check=True,
                         capture_output=True, text=True, timeout=180).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def converge(n: int, store_url: str, endpoint: str | None, work: Path, poll: float) -> dict:
    import mlflow
    from mlflow import MlflowClient

    from edgeslim.deploy import signing, trust
    from edgeslim.deploy.agent.device import Agent, AgentSettings
    from edgeslim.deploy.controller import Controller, WaveRolloutConfig
    from edgeslim.deploy.release import sign_version
    from edgeslim.deploy.store import open_store
    from edgeslim.plugins import edge_flavor

    # The three roles, as `edgeslim fleet keygen --role ...` and `root-init` make them.
    keys = {role: signing.load_private_key(signing.generate_keypair(work / "keys", role=role)[0])
            for role in ("root", "release", "fleet")}
    envelope = trust.sign_with(trust.make_root(root_keys=[keys["root"]], release_keys=[keys["release"]],
                                               fleet_keys=[keys["fleet"]], fleet="bench"), [keys["root"]])
    (work / "keys" / "root.json").write_text(json.dumps(envelope))
    root = trust.Root(envelope["signed"])
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    with mlflow.start_run():
        info = edge_flavor.log_model(_tiny_onnx(work / "m.onnx"), "model",
                                     metadata={"gate": {"passed": True, "summary": "bench model"}})
    mv = mlflow.register_model(info.model_uri, "bench")
    sign_version("bench", str(mv.version), keys["release"])  # what the gated register step does
    MlflowClient().set_registered_model_alias("bench", "edge-candidate", mv.version)
    store = open_store(store_url, endpoint_url=endpoint, create_bucket=True)
    agents = [Agent(store=store, fleet="bench", device_id=f"dev{i:03d}",
                    device_class=("orin-sm87-jp6.1-trt10.3" if i % 2 else "xavier-sm72-jp5.1-trt8.5"),
                    state_dir=work / "devices" / f"dev{i:03d}", root=root,
                    settings=AgentSettings(poll_interval=poll, heartbeat_interval=30, health_in_process=True))
              for i in range(n)]
    for a in agents:
        a.recover()
        a.register()
    c = Controller(store, "bench", signing_key=keys["fleet"], root=root)
    c.enrol_many({a.device_id: (a.device_class, a.public_key) for a in agents})
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    cfg = WaveRolloutConfig.from_strings({"waves": "1,10,50,100", "poll_interval_s": "0.5",
                                          "wave_timeout_s": "300", "max_failure_pct": "10"})
    t0 = time.perf_counter()
    rec = c.create("bench-r1", "models:/bench@edge-candidate", cfg)
    seconds = time.perf_counter() - t0
    waves = [(w["finished_at"] - w["started_at"]) for w in rec["waves"]]
    for a in agents:
        a.stop()
    for t in threads:
        t.join(10)
    ok = sum(d["outcome"] == "committed" for d in rec["devices"].values())
    return {"devices": n, "committed": ok, "state": rec["state"], "seconds_to_converge": round(seconds, 2),
            "wave_sizes": [len(w["devices"]) for w in rec["waves"]],
            "wave_seconds": [round(w, 2) for w in waves], "agent_poll_interval_s": poll}


def agent_footprint(store_url: str, endpoint: str | None, work: Path) -> dict:
    """Import time (median of 5 fresh interpreters) and idle RSS of a real agent process."""
    code = ("import time; t=time.perf_counter(); import edgeslim.deploy.agent.device; a=time.perf_counter()-t; "
            "import boto3; print(a, time.perf_counter()-t)")
    runs = [list(map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split())) for _ in range(5)]
    args = [sys.executable, "-m", "edgeslim.deploy.agent.device", "--store", store_url, "--fleet", "bench",
            "--device-id", "dev000", "--device-class", "xavier-sm72-jp5.1-trt8.5",
            "--state-dir", str(work / "devices" / "dev000"), "--root", str(work / "keys" / "root.json"),
            "--poll-interval", "0.5"]
    if endpoint:
        args += ["--endpoint-url", endpoint]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    try:
        time.sleep(8)  # registered, polled, idle (the model it runs is already installed)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    finally:
        proc.terminate()
        proc.wait(10)
    return {"agent_import_s_median": round(statistics.median(r[0] for r in runs), 3),
            "agent_plus_boto3_import_s_median": round(statistics.median(r[1] for r in runs), 3),
            "agent_idle_rss_mb": round(rss_kb / 1024, 1)}


def build_parser() -> argparse.ArgumentParser:
    from edgeslim.components.common.helptext import plain

    p = argparse.ArgumentParser(prog="python -m edgeslim.pipelines.bench_fleet", description=plain(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100, help="simulated devices, each an agent thread (default 100)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="agent poll interval (s)")
    p.add_argument("--store", help="s3://bucket/prefix; default: start a loopback RGW")
    p.add_argument("--endpoint-url", help="S3 endpoint of --store (an S3-compatible server)")
    p.add_argument("--out", help="also write the JSON result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgeslim-bench-") as tmp:
        work = Path(tmp)
        rgw = None
        store, endpoint = args.store, args.endpoint_url
        if store is None:
            rgw = start_rgw(work)
            os.environ["AWS_ACCESS_KEY_ID"] = rgw["AWS_ACCESS_KEY_ID"]
            os.environ["AWS_SECRET_ACCESS_KEY"] = rgw["AWS_SECRET_ACCESS_KEY"]
            store, endpoint = "s3://bench/fleet", rgw["S3_ENDPOINT_URL"]
        try:
            result = {"store": "ceph-rgw-loopback" if rgw else store,
                      **converge(args.devices, store, endpoint, work, args.poll_interval),
                      **agent_footprint(store, endpoint, work), "cpus": os.cpu_count()}
        finally:
            if rgw:
                subprocess.run(["bash", str(REPO_S3), "stop", str(work / "rgw")], capture_output=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["committed"] == result["devices"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
