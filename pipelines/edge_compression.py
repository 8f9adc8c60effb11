"""The edge-compression pipeline: registry -> stages -> gate -> registry.

One generic pipeline, parameterised by the recipe (as JSON), so a cluster
compiles and uploads it once and every model reuses it::

    pull -> export(parent) ----------------------------.
         \\-> transform -> export(student) -> quantize -> evaluate -> gate
                                                       If passed: register / Else: reject
                                                       -> report (OneOf)

What Kubernetes needs is fixed when the pipeline is compiled, from the recipe: one engine
task per device class (the image of its platform, arm64 for Jetson classes, a GPU, the class's
node selector with its CPU architecture, the engine tolerations), image pull Secrets, CPU and memory
requests per kind of task, a GPU for training when the recipe asks, retries, and the
credential Secrets. :func:`submit_run` and :func:`follow_run` send it to a Kubeflow
Pipelines endpoint and follow the run.
"""


import contextlib
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from kfp import compiler, dsl

from edgeslim.components.common.errors import EdgeslimError
from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.kfp.ops import DEFAULT_ENGINE_IMAGE, DEFAULT_IMAGE, DEFAULT_TRAIN_IMAGE, make_ops
from edgeslim.components.kfp.placement import (apply_device_class_placement, apply_task_settings,
                                               check_node_selectors, engine_image_for, quantize_trains)
from edgeslim.components.recipe import ClusterConfig, Recipe, ResourcesConfig

PIPELINE_NAME = "edgeslim-edge-compression"
COMPILED = Path(__file__).with_name("edge_compression.yaml")


def build_pipeline(base_image: str = DEFAULT_IMAGE, *, engines: TensorRTEngineConfig | None = None,
                   placement: bool = True, recipe: Recipe | None = None, recipe_default: bool = True,
                   engine_image: str = DEFAULT_ENGINE_IMAGE, train_image: str = DEFAULT_TRAIN_IMAGE,
                   torch_stages: bool = True):
    """The ``@dsl.pipeline`` function, with components on ``base_image``.

    Args:
        base_image: image of the CPU tasks (edgeslim installed).
        engines: the device classes engine tasks are laid out for, with their node
            selectors (Kubernetes places tasks when the pipeline is compiled, so the
            classes are fixed then; the recipe's ``engines`` settings apply at run time).
            Default: the recipe's.
        placement: the Kubernetes settings: GPUs and node selectors, CPU and memory
            requests, retries, Secrets (the local runner has no nodes and ignores them).
        recipe: the recipe whose device classes, ``resources`` and ``cluster`` settings shape
            the tasks.
        recipe_default: make the recipe's JSON the default of the ``recipe_json`` parameter
            (a run started from the KFP UI then needs no input).
        engine_image: image of the engine tasks of x86_64 TensorRT 10 classes (TensorRT installed); the
            other classes' tasks run on ``engines.images`` of the recipe, else on their platform's image.
        train_image: image of the training tasks when ``resources.train.gpu`` asks for a GPU
            (a CUDA build of torch).
        torch_stages: lay out the transform task and the student's export. False for a pipeline
            that only ever runs recipes without distill or prune stages (the local runner lays out
            each run for its own recipe): quantize then starts from the parent's export, two
            tasks fewer. A compiled pipeline keeps them, since any recipe may be passed to it.

    Raises:
        ConfigError: a device class has no node selector (with ``placement``).
    """
    engines = engines or (recipe.engines if recipe is not None else TensorRTEngineConfig())
    resources = recipe.resources if recipe is not None else ResourcesConfig()
    cluster = recipe.cluster if recipe is not None else ClusterConfig()
    trains_in_quantize = recipe is not None and quantize_trains(recipe)
    if placement:
        check_node_selectors(engines)
    images = {}
    if resources.train.gpu:
        images["transform_op"] = train_image
        if trains_in_quantize:
            images["quantize_op"] = train_image
    ops = make_ops(base_image, images=images)
    default_recipe = recipe.to_json() if recipe is not None and recipe_default else None

    def on_cluster(task, kind: str):
        if placement:
            apply_task_settings(task, kind, resources, cluster)
        return task

    def body(recipe_json, tracking_uri):
        pulled = ops.pull_op(recipe_json=recipe_json, tracking_uri=tracking_uri).set_display_name("pull")
        parent_onnx = ops.export_op(recipe_json=recipe_json, model=pulled.outputs["model"]) \
            .set_display_name("export parent")
        if torch_stages:
            transformed = ops.transform_op(recipe_json=recipe_json, model=pulled.outputs["model"]) \
                .set_display_name("transform (distill, prune)")
            student_onnx = ops.export_op(recipe_json=recipe_json, model=transformed.outputs["student"]) \
                .set_display_name("export student")
            student, student_export, transform_info = (transformed.outputs["student"], student_onnx,
                                                       transformed.outputs["info"])
        else:  # the parent is the model quantize starts from
            student, student_export, transform_info = pulled.outputs["model"], parent_onnx, None
        quantized = ops.quantize_op(
            recipe_json=recipe_json, tracking_uri=tracking_uri, onnx_model=student_export.outputs["onnx_model"],
            student=student, parent_onnx=parent_onnx.outputs["onnx_model"],
        ).set_display_name("quantize")
        evaluated = ops.evaluate_op(
            recipe_json=recipe_json, qdq_model=quantized.outputs["qdq_model"],
            parent_onnx=parent_onnx.outputs["onnx_model"], student_onnx=student_export.outputs["onnx_model"],
            parent_export=parent_onnx.outputs["info"], student_export=student_export.outputs["info"],
        ).set_display_name("evaluate")
        gated = ops.gate_op(recipe_json=recipe_json, evaluation=evaluated.outputs["evaluation"]) \
            .set_display_name("gate")
        kinds = [(pulled, "light"), (parent_onnx, "compute"),
                 (quantized, "train" if trains_in_quantize else "compute"), (evaluated, "compute"), (gated, "light")]
        if torch_stages:
            kinds += [(transformed, "train"), (student_onnx, "compute")]
        for t, kind in kinds:
            t.set_caching_options(False)
            on_cluster(t, kind)
        # One engine task per device class, each on its platform's image and a GPU node of that
        # class. It builds only when the gate passed, verifies its engine, and a failing engine
        # stops the registration. (The tasks sit outside dsl.If, which the plan task decides for them.)
        plan = ops.plan_engines_op(recipe_json=recipe_json, parent=pulled.outputs["parent"],
                                   verdict=gated.outputs["verdict"]) \
            .set_display_name("plan engines").set_caching_options(False)
        on_cluster(plan, "light")
        collected = []
        for key in engines.device_classes:
            eng = ops.engine_build_on(engine_image_for(key, engines, engine_image))(
                qdq_model=quantized.outputs["qdq_model"], device_class=key, plan=plan.outputs["plan"],
            ).set_display_name(f"engine {key}").set_caching_options(False)
            if placement:
                apply_device_class_placement(eng, key, engines)
            on_cluster(eng, "engine")
            collected.append(eng.outputs["Output"])
        with dsl.If(gated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
            reg = ops.register_op(
                recipe_json=recipe_json, tracking_uri=tracking_uri, qdq_model=quantized.outputs["qdq_model"],
                parent=pulled.outputs["parent"], evaluation=evaluated.outputs["evaluation"],
                verdict=gated.outputs["verdict"], engines=collected,
            ).set_display_name("register").set_caching_options(False)
            on_cluster(reg, "compute")
        with dsl.Else(name="gate-failed"):
            rej = ops.reject_op(verdict=gated.outputs["verdict"]).set_display_name("reject") \
                .set_caching_options(False)
            on_cluster(rej, "light")
        report = ops.report_op(
            recipe_json=recipe_json, tracking_uri=tracking_uri, parent=pulled.outputs["parent"],
            parent_export=parent_onnx.outputs["info"], **({"transform": transform_info} if torch_stages else {}),
            quantized=quantized.outputs["info"], evaluation=evaluated.outputs["evaluation"],
            verdict=gated.outputs["verdict"],
            registered=dsl.OneOf(reg.output, rej.output),
            qdq_model=quantized.outputs["qdq_model"],
        ).set_display_name("report").set_caching_options(False)
        on_cluster(report, "light")
        return report.outputs["report"]

    # kfp reads the parameters from the signature: with a recipe, its JSON is the default.
    if default_recipe is None:
        def edge_compression(recipe_json: str, tracking_uri: str = "") -> dsl.Artifact:
            return body(recipe_json, tracking_uri)
    else:
        def edge_compression(recipe_json: str = default_recipe, tracking_uri: str = "") -> dsl.Artifact:
            return body(recipe_json, tracking_uri)

    return dsl.pipeline(
        name=PIPELINE_NAME,
        description="Compress a registered PyTorch model to a gated int8 Q/DQ ONNX and register it "
        "back in MLflow with its lineage.",
    )(edge_compression)


def compile_pipeline(out: str | Path, base_image: str = DEFAULT_IMAGE,
                     engines: TensorRTEngineConfig | None = None, *, recipe: Recipe | None = None,
                     recipe_default: bool = True, engine_image: str = DEFAULT_ENGINE_IMAGE,
                     train_image: str = DEFAULT_TRAIN_IMAGE) -> Path:
    """Write the pipeline as Kubeflow IR YAML, laid out for ``recipe`` (its JSON the run's default
    unless ``recipe_default`` is false) or for ``engines``; with neither, for the demo recipe, and
    ``recipe_json`` stays a required parameter."""
    if engines is None and recipe is None:
        from edgeslim.components.recipe import load_recipe
        from edgeslim.pipelines.demo import DEMO_RECIPE

        recipe, recipe_default = load_recipe(DEMO_RECIPE), False
    pipeline = build_pipeline(base_image, engines=engines, recipe=recipe, recipe_default=recipe_default,
                              engine_image=engine_image, train_image=train_image)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, package_path=str(out))
    return out


# --- Kubeflow Pipelines endpoint: submit, follow --------------------------------------------------

class KubeflowError(EdgeslimError):
    """Kubeflow Pipelines cannot be reached, refuses the credentials, or a run on it failed."""


FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")
_TOKEN_FIX = ("get a new one (e.g. `kubectl -n PROFILE create token default-editor`) and pass it with "
              "--token or $KFP_TOKEN")


def _unreachable(host: str, reason: str) -> KubeflowError:
    return KubeflowError(
        f"cannot reach Kubeflow Pipelines at {host} ({reason}); check --host: the KFP UI or API address, "
        "e.g. `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80` and --host http://localhost:8080")


def _refused(host: str, status: int) -> KubeflowError:
    return KubeflowError(f"Kubeflow Pipelines at {host} refused the credentials (HTTP {status}): the token is "
                         f"missing, wrong or expired; {_TOKEN_FIX}")


def _reason(exc: BaseException) -> str:
    """A short reason for a connection error (urllib's or urllib3's)."""
    inner = getattr(exc, "reason", None) or exc
    text = str(getattr(inner, "strerror", None) or inner).strip()
    # urllib3 wraps the socket error: keep its last clause ("Connection refused").
    return (text.rsplit(": ", 1)[-1].rstrip(")'\"") or type(inner).__name__)[:120]


def check_endpoint(host: str, token: Optional[str] = None, timeout: float = 10.0) -> dict:
    """Ask the KFP API's health route (``/apis/v2beta1/healthz``) before anything is sent.

    Returns:
        The health answer (``multi_user``, ``commit_sha``, ...).

    Raises:
        KubeflowError: one line each for an unreachable host, refused credentials (401/403 or a
            login page) and an address that is not the KFP API.
    """
    if not host.startswith(("http://", "https://")):
        raise KubeflowError(f"--host: got {host!r}; use the URL of the KFP UI or API, e.g. http://localhost:8080")
    req = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz", headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (the user's own KFP URL)
            body = resp.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise _refused(host, exc.code) from None
        if exc.code == 404:
            raise KubeflowError(
                f"{host} answers, but not as the Kubeflow Pipelines API (HTTP 404 on /apis/v2beta1/healthz); "
                "point --host at the KFP UI or API service, with its path (e.g. http://HOST/pipeline on a "
                "Kubeflow platform)") from None
        raise KubeflowError(f"Kubeflow Pipelines at {host} answered HTTP {exc.code} {exc.reason} to its health "
                            "check; check its API server (kubectl -n kubeflow logs deploy/ml-pipeline)") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(host, _reason(exc)) from None
    try:
        health = json.loads(body)
    except ValueError:
        health = None
    if not isinstance(health, dict):  # an identity proxy's sign-in page
        raise KubeflowError(f"Kubeflow Pipelines at {host} answered with a sign-in page, not the API: you are not "
                            f"signed in or the token expired; {_TOKEN_FIX}")
    return health


@contextlib.contextmanager
def _kfp_errors(host: str):
    """Turn what ``kfp.Client`` raises into one line each."""
    import kfp_server_api

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # kfp prints its own links; we print ours
            yield
    except kfp_server_api.ApiException as exc:
        if exc.status in (401, 403):
            raise _refused(host, exc.status) from None
        if not exc.status:  # kfp_server_api wraps connection errors too
            raise _unreachable(host, _reason(exc)) from None
        detail = ""
        try:
            detail = str(json.loads(exc.body or "{}").get("message", ""))
        except (ValueError, AttributeError):
            detail = str(exc.body or "")
        raise KubeflowError(f"Kubeflow Pipelines at {host} refused the request (HTTP {exc.status} {exc.reason}"
                            f"{': ' + detail.splitlines()[0][:200] if detail.strip() else ''}); check the "
                            "namespace (--namespace) and the KFP API server's log") from None
    except EdgeslimError:
        raise
    except Exception as exc:  # urllib3 connection errors, DNS, TLS
        import urllib3

        if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
            raise _unreachable(host, _reason(exc)) from None
        raise


def submit_run(pipeline, *, host: str, arguments: dict, experiment: str, namespace: Optional[str] = None,
               token: Optional[str] = None, run_name: Optional[str] = None):
    """Check the endpoint, then create a run of ``pipeline`` with ``kfp.Client``.

    Returns:
        ``(client, run_id, url)``: the client (for :func:`follow_run`) and the run's page.

    Raises:
        KubeflowError: the endpoint is unreachable, refuses the credentials or refuses the run.
    """
    import kfp

    check_endpoint(host, token)
    with _kfp_errors(host):
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token or None)
        run = client.create_run_from_pipeline_func(pipeline, arguments=arguments, run_name=run_name,
                                                   experiment_name=experiment, namespace=namespace)
    prefix = client._get_url_prefix() if hasattr(client, "_get_url_prefix") else host.rstrip("/")
    return client, run.run_id, f"{prefix}/#/runs/details/{run.run_id}"


def _failed_task(run) -> tuple[str, str]:
    """``(task name, error message)`` of the task that failed, as far as the API tells."""
    details = getattr(getattr(run, "run_details", None), "task_details", None) or []
    failed = [t for t in details if str(getattr(t, "state", "") or "").upper() == "FAILED"]
    # Executor tasks first: DAG tasks (root, conditions, loops) fail with their children.
    leaves = [t for t in failed if not any(getattr(c, "task_id", None) for c in (getattr(t, "child_tasks", None) or []))]
    for t in leaves + failed:
        msg = getattr(getattr(t, "error", None), "message", None) or ""
        name = getattr(t, "display_name", None) or ""
        if name and name != "root":
            return name, msg
    return "", getattr(getattr(run, "error", None), "message", None) or ""


def follow_run(client, run_id: str, url: str, *, host: str, timeout: float = 0.0, poll: float = 10.0,
               progress: Callable[[str], None] | None = None) -> str:
    """Poll the run until it ends; return its final state (``SUCCEEDED``).

    Raises:
        KubeflowError: the run failed or was canceled (one line naming the failed task and
            its error, where the API gives them), or it did not end within ``timeout`` seconds.
    """
    start, last = time.monotonic(), None
    while True:
        with _kfp_errors(host):
            run = client.get_run(run_id)
        state = str(getattr(run, "state", "") or "PENDING").upper()
        if state != last and progress:
            progress(f"run {run_id}: {state.lower()}")
        last = state
        if state in FINAL_STATES:
            break
        if timeout and time.monotonic() - start > timeout:
            raise KubeflowError(f"run {run_id} is still {state.lower()} after {timeout:.0f} s; follow it at {url} "
                                "(or wait longer with --timeout)")
        time.sleep(poll)
    if state == "SUCCEEDED":
        return state
    if state == "CANCELED":
        raise KubeflowError(f"run {run_id} was canceled on the cluster ({url}); submit again to rerun it")
    task, msg = _failed_task(run)
    where = f" in task {task!r}" if task else ""
    why = f": {msg.strip().splitlines()[-1][:240]}" if msg.strip() else ""
    raise KubeflowError(f"run {run_id} {state.lower()}{where}{why}; read the task's log at {url}, fix the cause "
                        "and submit again")


if __name__ == "__main__":
    print(compile_pipeline(COMPILED))
