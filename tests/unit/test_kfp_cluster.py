"""The pipeline as a Kubeflow cluster runs it: compiled from a recipe with two device classes and a GPU
for training, and submitted with `edgeslim submit` to a stand-in of the KFP REST API on loopback.

The compiled IR is read as the cluster reads it: one engine task per class, on its platform's image (the
Orin class on the arm64 JetPack image, the Ada class on the x86_64 TensorRT image) with a GPU and the
class's node selector and architecture, image pull Secrets on every task, training tasks with an
accelerator, CPU and memory requests on every task, the credential Secrets in the ``kubernetes``
platform spec, retries, and ``--source`` in the run's parameters. ``submit`` talks to the real
``kfp.Client``; the stand-in server answers the REST routes that client calls.
"""

# No `from __future__ import annotations`: kfp reads the components' real annotations.

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.recipe import recipe_from_dict
from edgeslim.pipelines.demo import DEMO_RECIPE

ORIN = "orin-sm87-jp6.1-trt10.3"
ADA = "ada-sm89-trt10"
ENGINE_IMAGE = "registry.example/edgeslim:test-tensorrt10.3"
TRAIN_IMAGE = "registry.example/edgeslim:test-cuda"
SOURCE = "models:/digits-teacher/7"
MLFLOW_ENV = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def cluster_recipe(**changes) -> dict:
    """The demo recipe (QAT in its quantize search) for two device classes, with a GPU for training."""
    d = yaml.safe_load(DEMO_RECIPE.read_text())
    d["engines"].update(device_classes=[ORIN, ADA], node_selectors={ADA: {"nvidia.com/gpu.product": "NVIDIA-L4"}})
    d["resources"] = {"train": {"gpu": 1, "cpu": 4, "memory": "16Gi"}, "retries": 2}
    d["cluster"] = {"mlflow_secret": "team-mlflow", "image_pull_secrets": ["regcred"]}
    d.update(changes)
    return d


def edgeslim(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # A process of its own: the CLI stops every process it started when it ends.
    return subprocess.run([sys.executable, "-m", "edgeslim", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeslim: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`edgeslim compile --recipe R --source ...`: the IR's pipeline spec and Kubernetes platform spec."""
    tmp = tmp_path_factory.mktemp("compile")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cluster_recipe()))
    out = tmp / "pipeline.yaml"
    proc = edgeslim("compile", "--recipe", str(recipe), "--source", SOURCE, "-o", str(out),
                    "--engine-image", ENGINE_IMAGE, "--train-image", TRAIN_IMAGE)
    assert proc.returncode == 0, proc.stderr
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec) -> dict:
    """Every task of the pipeline, nested DAGs (loop, condition branches) included, by name."""
    out = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def executor_of(spec, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]].get("executorLabel", "")


def test_one_engine_task_per_device_class_on_its_platforms_image_with_its_gpu_and_node(compiled):
    spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    engines = {t["inputs"]["parameters"]["device_class"]["runtimeValue"]["constant"]:
               spec["components"][t["componentRef"]["name"]]["executorLabel"]
               for t in spec["root"]["dag"]["tasks"].values() if "device_class" in t.get("inputs", {}).get("parameters", {})}
    assert sorted(engines) == sorted([ORIN, ADA])
    assert executors[engines[ADA]]["container"]["image"] == ENGINE_IMAGE  # --engine-image: x86_64 TensorRT 10
    assert executors[engines[ORIN]]["container"]["image"].endswith("-jetpack6.1")  # arm64 L4T
    for key, arch, selector in ((ORIN, "arm64", {"edgeslim.io/device-class": ORIN}),
                                (ADA, "amd64", {"nvidia.com/gpu.product": "NVIDIA-L4"})):
        container = executors[engines[key]]["container"]
        assert container["resources"]["accelerator"] == {"count": "1", "resourceCount": "1",
                                                         "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
        placed = k8s[engines[key]]
        assert placed["nodeSelector"]["nodeSelectorJson"]["runtimeValue"]["constant"] == {
            "kubernetes.io/arch": arch, **selector}
        assert placed["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    images = {name: ex["container"]["image"] for name, ex in executors.items()}
    assert [n for n, i in images.items() if i == ENGINE_IMAGE] == [engines[ADA]]


def test_training_tasks_ask_for_a_gpu_on_the_training_image(compiled):
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    # transform (distill, prune) and quantize (the demo's search ends in QAT) train.
    for name in ("exec-transform-op", "exec-quantize-op"):
        c = executors[name]["container"]
        assert c["image"] == TRAIN_IMAGE
        assert c["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert c["resources"]["accelerator"]["resourceCount"] == "1"
        assert (c["resources"]["resourceCpuRequest"], c["resources"]["resourceMemoryRequest"]) == ("4", "16Gi")
    gpu = sorted(n for n, ex in executors.items() if "accelerator" in ex["container"].get("resources", {}))
    assert gpu == ["exec-engine-build-op", "exec-engine-build-op-2", "exec-quantize-op", "exec-transform-op"]


def test_every_task_has_cpu_and_memory_requests_retries_and_the_secrets(compiled):
    spec, k8s = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 13  # pull, export x2, transform, quantize, evaluate, gate, plan, engine x2 (one per
    #                              platform image), register, reject, report
    for name, ex in executors.items():
        res = ex["container"].get("resources", {})
        assert res.get("resourceCpuRequest") and res.get("resourceMemoryRequest"), name
        # Credentials come from Secrets by name; nothing in the container carries a value.
        assert "env" not in ex["container"], name
        secrets = {s["secretName"]: {m["envVar"] for m in s["keyToEnv"]} for s in k8s[name]["secretAsEnv"]}
        assert secrets == {"team-mlflow": MLFLOW_ENV, "edgeslim-s3": S3_ENV}, name
        assert all(s["optional"] for s in k8s[name]["secretAsEnv"]), name
        assert [s["secretName"] for s in k8s[name]["imagePullSecret"]] == ["regcred"], name
    assert executors["exec-pull-op"]["container"]["resources"]["resourceCpuRequest"] == "500m"
    assert executors["exec-evaluate-op"]["container"]["resources"]["resourceMemoryRequest"] == "8Gi"
    tasks = all_tasks(spec)
    runs = {n: t for n, t in tasks.items() if executor_of(spec, t)}
    assert len(runs) == 13  # export twice, each its own executor
    for name, task in runs.items():
        assert task.get("retryPolicy", {}).get("maxRetryCount") == 2, name


def test_the_recipe_with_its_source_override_is_the_runs_default_input(compiled):
    spec, _ = compiled
    param = spec["root"]["inputDefinitions"]["parameters"]["recipe_json"]
    recipe = recipe_from_dict(json.loads(param["defaultValue"]))
    assert recipe.source == SOURCE
    assert recipe.engines.device_classes == [ORIN, ADA] and recipe.resources.train.gpu == 1


def test_without_a_gpu_request_training_stays_on_the_cpu_image_and_the_local_runner_gets_no_kubernetes(tmp_path):
    from edgeslim.components.kfp.ops import DEFAULT_IMAGE
    from edgeslim.pipelines.edge_compression import build_pipeline, compile_pipeline

    d = cluster_recipe()
    del d["resources"]
    out = compile_pipeline(tmp_path / "p.yaml", recipe=recipe_from_dict(d))
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-transform-op"]["container"]["image"] == DEFAULT_IMAGE
    assert "accelerator" not in executors["exec-transform-op"]["container"]["resources"]
    assert not any("retryPolicy" in t for t in all_tasks(spec).values())

    from kfp import compiler

    local = build_pipeline(recipe=recipe_from_dict(cluster_recipe()), placement=False)
    compiler.Compiler().compile(local, str(tmp_path / "local.yaml"))
    docs = list(yaml.safe_load_all((tmp_path / "local.yaml").read_text()))
    assert len(docs) == 1  # no platform spec at all
    assert all("resources" not in ex["container"] for ex in docs[0]["deploymentSpec"]["executors"].values())


def test_a_device_class_without_a_node_selector_is_refused_in_one_line(tmp_path, request):
    from edgeslim.components.engine import devices
    from edgeslim.pipelines.edge_compression import compile_pipeline

    key = "lab-sm86-trt10-noselector"
    devices.register_device_class(devices.DeviceClass(key, "datacenter", "Ampere", (8, 6), "10"))
    request.addfinalizer(lambda: devices.DEVICE_CLASSES.unregister(key))  # the other tests see the built-ins
    d = cluster_recipe()
    d["engines"].update(device_classes=[ADA, key])
    with pytest.raises(ConfigError) as exc:
        compile_pipeline(tmp_path / "p.yaml", recipe=recipe_from_dict(d))
    msg = str(exc.value)
    assert "\n" not in msg and f"device class {key} has no node selector" in msg
    assert "engines.node_selectors" in msg
    # The local runner has no nodes: the same recipe runs there.
    from edgeslim.pipelines.edge_compression import build_pipeline

    build_pipeline(recipe=recipe_from_dict(d), placement=False)


# --- submit -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeKfp:
    """The KFP v2beta1 REST routes `kfp.Client` calls to create and follow a run, on loopback."""

    def __init__(self, *, final_state: str = "SUCCEEDED", status: int = 200):
        self.final_state, self.status = final_state, status
        self.runs: list[dict] = []
        self.headers: list[dict] = []
        self.polls = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.headers.append(dict(self.headers))
                if fake.status != 200:
                    return self._send(fake.status, {"error": "Unauthorized", "code": 16})
                path = self.path.split("?")[0]
                if path == "/apis/v2beta1/healthz":
                    return self._send(200, {"commit_sha": "fake", "tag_name": "2.5.0", "multi_user": False})
                if path == "/apis/v2beta1/experiments":
                    return self._send(200, {})
                if path == "/apis/v2beta1/runs/run-1":
                    fake.polls += 1
                    return self._send(200, fake.run_state())
                self._send(404, {"error": "not found"})

            def do_POST(self):
                fake.headers.append(dict(self.headers))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                if self.path == "/apis/v2beta1/experiments":
                    return self._send(200, {"experiment_id": "exp-1", "display_name": body.get("display_name")})
                if self.path == "/apis/v2beta1/runs":
                    fake.runs.append(body)
                    return self._send(200, {"run_id": "run-1", "experiment_id": "exp-1", "state": "PENDING"})
                self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def run_state(self) -> dict:
        if self.polls < 2:
            return {"run_id": "run-1", "state": "RUNNING"}
        run = {"run_id": "run-1", "state": self.final_state}
        if self.final_state == "FAILED":
            run["error"] = {"message": "1 task failed"}
            run["run_details"] = {"task_details": [
                {"display_name": "root", "state": "FAILED", "child_tasks": [{"task_id": "t-2"}]},
                {"task_id": "t-1", "display_name": "pull", "state": "SUCCEEDED"},
                {"task_id": "t-2", "display_name": "quantize", "state": "FAILED",
                 "child_tasks": [{"pod_name": "edgeslim-quantize-123"}],
                 "error": {"message": "Traceback ...\nDataError: calibration: the train split is empty"}},
            ]}
        return run

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cluster_recipe()))
    return p


def test_submit_to_an_unreachable_host_is_one_line(recipe_file):
    proc = edgeslim("submit", str(recipe_file), "--host", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:" in line and "check --host" in line


def test_submit_with_an_expired_token_is_one_line(recipe_file):
    fake = FakeKfp(status=401)
    try:
        proc = edgeslim("submit", str(recipe_file), "--host", fake.url, "--token", "expired")
    finally:
        fake.close()
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "refused the credentials (HTTP 401)" in line and "--token" in line
    assert fake.headers[0]["Authorization"] == "Bearer expired"
    assert fake.runs == []


def test_submit_wait_follows_the_run_and_names_the_failed_task(recipe_file):
    fake = FakeKfp(final_state="FAILED")
    try:
        proc = edgeslim("submit", str(recipe_file), "--host", fake.url, "--source", SOURCE, "--wait",
                        "--poll", "0.05", "--s3-secret", "")
    finally:
        fake.close()
    assert proc.returncode == 2, proc.stderr
    url = f"{fake.url}/#/runs/details/run-1"
    assert f"submitted run run-1: {url}" in proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("edgeslim: error: run run-1 failed in task 'quantize': "
                           "DataError: calibration: the train split is empty"), proc.stderr
    assert url in line
    # What reached the cluster: the --source override in the run's parameters, the recipe's layout.
    (run,) = fake.runs
    assert recipe_from_dict(json.loads(run["runtime_config"]["parameters"]["recipe_json"])).source == SOURCE
    # The client sends the pipeline spec and its Kubernetes platform spec together.
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    engine_images = sorted(ex["container"]["image"].rsplit("-", 1)[-1]
                           for name, ex in spec["deploymentSpec"]["executors"].items() if "engine-build" in name)
    assert engine_images == ["jetpack6.1", "tensorrt10.3"]  # the Orin class on arm64 L4T, the Ada class on x86_64
    envs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-pull-op"]["secretAsEnv"]
    assert [s["secretName"] for s in envs] == ["team-mlflow"]  # --s3-secret '' mounts none


def test_submit_wait_prints_the_final_state_of_a_run_that_succeeded(recipe_file):
    fake = FakeKfp(final_state="SUCCEEDED")
    try:
        proc = edgeslim("submit", str(recipe_file), "--host", fake.url, "--wait", "--poll", "0.05")
    finally:
        fake.close()
    assert proc.returncode == 0, proc.stderr
    assert f"run run-1 succeeded: {fake.url}/#/runs/details/run-1" in proc.stdout
    assert fake.polls == 2  # running, then succeeded
