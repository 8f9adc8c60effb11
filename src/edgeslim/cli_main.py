"""``edgeslim demo | run | init | compile | submit``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgeslim.components.common.errors import ConfigError, GateRejected


_renderer = None


def _progress(msg: str, kind: str = "note") -> None:
    """Progress on the terminal (one redrawn line for epochs and trials), plain lines elsewhere."""
    global _renderer
    from edgeslim.components.common import progress

    if os.environ.get(progress.ENV) == "off":  # edgeslim --quiet
        return
    if _renderer is None:  # made before any redirection, so it keeps the real stderr
        _renderer = progress.Renderer(sys.stderr)
    _renderer(msg, kind)


def _ticking(doing: str):
    """A step that may be silent: its lines go through the returned ticker, which says ``doing``
    again after a few seconds without one (``components/common/progress.py``)."""
    from edgeslim.components.common.progress import Ticker

    return Ticker(_progress, doing)


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded digits default")
    p.add_argument("--workdir", default="./edgeslim-demo", help="where MLflow, artifacts and reports go")
    p.add_argument("--workload", choices=("digits", "detect"), default="digits",
                   help="digits: a classifier (default); detect: a YOLO-style detector")
    p.add_argument("--verbose", action="store_true", help="show the Kubeflow runner's task logs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run the pipeline for a recipe (any registered PyTorch model)")
    p.add_argument("recipe", help="recipe YAML (write one with 'edgeslim init')")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: recipe, then $MLFLOW_TRACKING_URI)")
    p.add_argument("--workdir", default="./edgeslim-run", help="where reports and the local runner's files go")
    p.add_argument("--verbose", action="store_true", help="show the Kubeflow runner's task logs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("init", help="write a commented recipe with defaults for a registered model")
    p.add_argument("--source", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--npz", default=None, metavar="PATH",
                   help="the data: an .npz (local or s3://) with x_/y_ train/val/test arrays; this or --data is required")
    p.add_argument("--data", default=None, metavar="PROVIDER",
                   help="the data provider: imagefolder, yolo, coco, one of yours (with --data-arg), or "
                   "sklearn-digits (the demo's digits); this or --npz is required")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of --data's provider, e.g. root=s3://bucket/images (repeatable)")
    p.add_argument("--preprocess", choices=("auto", "imagenet", "yolo", "none"), default="auto",
                   help="how images become inputs (data.preprocess): imagenet (resize 256, crop 224, ImageNet "
                   "mean/std), yolo (letterbox 640, 0-1); auto (default): yolo for yolo/coco, imagenet for imagefolder")
    p.add_argument("--task", default="auto", metavar="KIND",
                   help="a registered task (classification, detection, or one of yours); auto (default): the task "
                   "whose labels the data holds (boxes: detection), else classification")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI, to read a detector's output shapes (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("-o", "--output", default="recipe.yaml", help="file to write (default recipe.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    def cluster_args(p) -> None:
        p.add_argument("--source", default=None, help="models:/NAME/VERSION (or @ALIAS): overrides the recipe's source")
        p.add_argument("--base-image", default=None, help="image of the CPU tasks, edgeslim installed "
                       "(deploy/images/Containerfile)")
        p.add_argument("--engine-image", default=None, help="image of the engine tasks of x86_64 TensorRT 10 "
                       "classes (deploy/images/Containerfile.tensorrt); Jetson classes run on the arm64 "
                       "'-jetpackX.Y' images, others on '-tensorrtN', unless engines.images names one")
        p.add_argument("--train-image", default=None, help="image of the training tasks when resources.train.gpu "
                       "asks for a GPU (a CUDA torch; deploy/images/Containerfile)")
        p.add_argument("--mlflow-secret", default=None, help="Kubernetes Secret with the MLflow credentials "
                       "(default: the recipe's cluster.mlflow_secret, else edgeslim-mlflow; '' for none)")
        p.add_argument("--s3-secret", default=None, help="Kubernetes Secret with the S3 credentials "
                       "(default: the recipe's cluster.s3_secret, else edgeslim-s3; '' for none)")

    p = sub.add_parser("compile", help="write the pipeline as Kubeflow IR YAML")
    p.add_argument("-o", "--output", required=True, help="YAML file to write")
    p.add_argument("--recipe", default=None, help="lay the tasks out for this recipe (device classes, resources, "
                   "secrets) and make it the runs' default input; default: the demo recipe's layout, no default")
    cluster_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="submit the pipeline to a Kubeflow Pipelines endpoint")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--host", required=True, help="KFP UI or API URL, e.g. http://localhost:8080 "
                   "(kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80)")
    p.add_argument("--token", default=None, help="bearer token for the KFP API (default: $KFP_TOKEN)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI as the cluster sees it")
    p.add_argument("--experiment", default="edgeslim", help="KFP experiment name")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace")
    p.add_argument("--wait", action="store_true", help="follow the run; print its final state and fail if it failed")
    p.add_argument("--timeout", type=float, default=0.0, help="with --wait: give up after this many seconds (0: never)")
    p.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    cluster_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("trigger", help="compress a watched model's new or champion versions when MLflow's "
                       "registry webhook says so (a service; $EDGESLIM_WEBHOOK_SECRET)")
    p.add_argument("--model", action="append", required=True, metavar="NAME",
                   help="a registered model to watch (repeat); every other model's events are ignored")
    p.add_argument("--recipe", required=True, help="recipe YAML; its source is replaced by each event's version")
    p.add_argument("--alias", default="champion", help="the alias whose move starts a compression (default champion)")
    p.add_argument("--runner", choices=("local", "kfp"), default="local",
                   help="local: Kubeflow's local runner in this process; kfp: submit to --host")
    p.add_argument("--host", default=None, help="with --runner kfp: the KFP UI or API URL")
    p.add_argument("--token", default=None, help="with --runner kfp: bearer token (default: $KFP_TOKEN)")
    p.add_argument("--experiment", default="edgeslim", help="with --runner kfp: KFP experiment name")
    p.add_argument("--namespace", default=None, help="with --runner kfp: Kubeflow profile namespace")
    for opt in ("--base-image", "--engine-image", "--train-image", "--mlflow-secret", "--s3-secret"):
        p.add_argument(opt, default=None, help=f"with --runner kfp: as for submit {opt}")
    p.add_argument("--tracking-uri", default=None, help="MLflow (default: recipe, then $MLFLOW_TRACKING_URI)")
    p.add_argument("--workdir", default="./edgeslim-trigger", help="local runner: reports go to WORKDIR/NAME-vN-HASH/")
    p.add_argument("--listen", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    p.add_argument("--port", type=int, default=8089, help="port to listen on (default 8089)")
    p.add_argument("--queue-size", type=int, default=16, help="versions that may wait (then 503: MLflow retries)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="seconds a client has to send its request")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve HTTPS with this certificate (and its chain); with --tls-key. Reloaded when it changes")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--url", default=None,
                   help="the URL given to MLflow's create_webhook (default: the listening address); at start, "
                        "one line says what MLflow's server needs to deliver there when its defaults refuse it")
    p.set_defaults(func=cmd_trigger, source=None)


def _preflight(recipe, tracking_uri: str, workdir: Path) -> None:
    """Catch bad input in this process, with one clear line, before any task starts."""
    from edgeslim.components.export import check_model_accepts
    from edgeslim.components.pull import pull
    from edgeslim.components.common.data import load_data

    data = load_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess)
    data.read_labels()  # a provider that reads labels when a task asks for them is checked here, whole
    res = pull(recipe.source, tracking_uri=tracking_uri, out_dir=workdir / "preflight")
    check_model_accepts(res.model, data.x_test[:4])
    from edgeslim.components.common.tasks import task_for

    task_for(recipe.task).check_model(res.model, data)


def _write_outputs(report: dict, workdir: Path) -> tuple[Path, Path]:
    import shutil

    from edgeslim.components.report_render import render_html

    html_src = Path(report.pop("_html_src", ""))
    rj, rh = workdir / "report.json", workdir / "report.html"
    rj.write_text(json.dumps(report, indent=2))
    if html_src.is_file():
        shutil.copyfile(html_src, rh)
    else:
        rh.write_text(render_html(report))
    return rj, rh


def execute(recipe, *, tracking_uri: str, workdir: Path, verbose: bool = False) -> int:
    """Preflight, run the pipeline locally, write the reports; 0 passed, 3 gate failed."""
    from edgeslim.components.report_render import format_table
    from edgeslim.pipelines.local import run_pipeline

    workdir.mkdir(parents=True, exist_ok=True)
    checking = f"checking {recipe.source} on {tracking_uri}"
    with _ticking(checking) as tick:
        tick(checking)
        _preflight(recipe, tracking_uri, workdir)
    _progress("running the pipeline with Kubeflow's local runner")
    try:
        report = run_pipeline(recipe, tracking_uri=tracking_uri, workdir=workdir, progress=_progress,
                              verbose=verbose)
    finally:
        if _renderer is not None:
            _renderer.close()
    rj, rh = _write_outputs(report, workdir)
    print(format_table(report))
    print(f"report: {rj}\nhtml:   {rh}")
    if not report["gate"]["passed"]:
        print(f"edgeslim: gate failed: {report['gate']['summary']}", file=sys.stderr)
        return GateRejected.exit_code
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from edgeslim.components.common.mlflow_server import MlflowServer
    from edgeslim.components.recipe import load_recipe
    from edgeslim.components.common.tracking import connect

    t0 = time.perf_counter()
    detect = getattr(args, "workload", "digits") == "detect"
    if detect:
        from edgeslim.pipelines.demo_detect import DETECT_RECIPE as recipe_path
        from edgeslim.pipelines.demo_detect import ensure_detector as ensure
        from edgeslim.pipelines.demo_detect import train_registrable_detector as train
    else:
        from edgeslim.pipelines.demo import DEMO_RECIPE as recipe_path
        from edgeslim.pipelines.demo import ensure_teacher as ensure
        from edgeslim.pipelines.demo import train_teacher as train
    workdir = Path(args.workdir).resolve()
    server = MlflowServer(workdir / "mlflow")
    fresh = not (server.root / "mlflow.db").exists()
    _progress(f"starting MLflow (SQLite) in {workdir}")
    server.launch()
    try:
        # A new store holds no reference model: train it while the server boots (about 10 s).
        trained = None
        if fresh:
            with _ticking("training the reference model") as tick:
                tick("training the reference model while MLflow starts")
                trained = train(progress=lambda text: tick(text, "epoch"))
        with _ticking(f"waiting for MLflow at {server.uri}"):
            server.wait_ready()
        _progress(f"MLflow at {server.uri}")
        client = connect(server.uri)
        with _ticking("registering the reference model") as tick:
            ensure(client, progress=tick, trained=trained)
        recipe = load_recipe(recipe_path).with_overrides(tracking_uri=server.uri)
        code = execute(recipe, tracking_uri=server.uri, workdir=workdir, verbose=args.verbose)
        # The runs' artifacts are served by the tracking server (mlflow-artifacts:/): the UI needs the same
        # destination, or its artifact list is empty and report.html is a 404.
        print(f"browse it: mlflow ui --backend-store-uri sqlite:///{server.root / 'mlflow.db'} "
              f"--artifacts-destination {server.artifacts}")
    finally:
        server.stop()
    verdict = "gate passed" if code == 0 else "gate failed" if code == GateRejected.exit_code else f"exit {code}"
    print(f"demo: {verdict} in {time.perf_counter() - t0:.1f} s")
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from edgeslim.components.recipe import load_recipe
    from edgeslim.components.common.tracking import resolve_tracking_uri

    recipe = load_recipe(args.recipe)
    uri = resolve_tracking_uri(args.tracking_uri or recipe.tracking_uri or None)
    recipe = recipe.with_overrides(tracking_uri=uri)
    return execute(recipe, tracking_uri=uri, workdir=Path(args.workdir).resolve(), verbose=args.verbose)


PREPROCESS_PRESETS = {
    "imagenet": {"resize": 256, "center_crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "yolo": {"letterbox": 640, "scale": 255.0},
}
IMAGE_PROVIDERS = {"imagefolder": "imagenet", "yolo": "yolo", "coco": "yolo"}


def _init_data(args: argparse.Namespace) -> tuple[str, str, dict, dict | None]:
    """The recipe's ``data:`` block, and the provider, its args and preprocessing it names."""
    import yaml

    if args.npz and args.data:
        raise ConfigError("--npz and --data: give one data source (--npz PATH is --data npz --data-arg path=PATH)")
    provider = "npz" if args.npz else (args.data or "")
    kwargs: dict = {"path": args.npz} if args.npz else {}
    for item in args.data_arg:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--data-arg {item!r}: use KEY=VALUE, e.g. root=s3://bucket/images")
        kwargs[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    if args.data_arg and not args.data:
        raise ConfigError("--data-arg: name the provider with --data (imagefolder, yolo, coco or yours)")
    if not provider:
        raise ConfigError("no data: pass --npz PATH (an .npz with x_/y_ train/val/test arrays) or --data PROVIDER "
                          "(imagefolder, yolo, coco, yours; --data sklearn-digits for the demo's digits)")
    preset = args.preprocess if args.preprocess != "auto" else IMAGE_PROVIDERS.get(provider, "none")
    preprocess = PREPROCESS_PRESETS.get(preset)
    lines = [f"  provider: {provider}", f"  args: {json.dumps(kwargs)}"]
    if preprocess:
        lines.append(f"  preprocess: {json.dumps(preprocess)}   # how an image becomes the model's input "
                     "(docs/data.md, Preprocessing)")
    return "\n".join(lines), provider, kwargs, preprocess


def cmd_init(args: argparse.Namespace) -> int:
    import tempfile

    from edgeslim.components.common.tasks import DEFAULT_KIND, TASKS, task_class
    from edgeslim.components.common.tracking import MODEL_URI
    from edgeslim.components.recipe import load_recipe

    m = MODEL_URI.match(args.source)
    if not m:
        raise ConfigError(f"--source {args.source!r}: use 'models:/NAME@ALIAS' or 'models:/NAME/VERSION'")
    out = Path(args.output)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it or -o another file")
    kind = args.task
    splits = None
    data, provider, kwargs, preprocess = _init_data(args)
    where = f"--npz {args.npz}" if args.npz else f"--data {provider}"
    if kind != "auto":
        task_class(kind)  # an unknown --task is refused here, in one line, before anything is read
    if kind != DEFAULT_KIND:
        from edgeslim.components.common.data import load_data
        from edgeslim.components.common.errors import DataError

        try:
            splits = load_data(provider, kwargs, preprocess)
        except DataError as exc:
            if kind != "auto":
                raise
            # auto: the data may live where only the pipeline can read it; say what was assumed
            others = "|".join(k for k in TASKS.names() if k != DEFAULT_KIND) or "KIND"
            print(f"edgeslim: note: could not read {where} to see its labels ({exc}); wrote a {DEFAULT_KIND} "
                  f"recipe; pass --task {others} if the labels are another task's", file=sys.stderr)
            kind = DEFAULT_KIND
    if kind == "auto":
        # the one registered task whose labels these are; the default task when none or several claim them
        claim = [k for k in TASKS.names() if splits is not None and task_class(k).recognises(splits)]
        kind = claim[0] if len(claim) == 1 else DEFAULT_KIND
    cls = task_class(kind)
    if splits is not None and not cls.recognises(splits):
        raise ConfigError(f"{where}: y_train does not hold {kind} labels; {kind} needs {cls.labels}")

    with tempfile.TemporaryDirectory(prefix="edgeslim-init-") as tmp:
        def load_model():
            from edgeslim.components.pull import pull

            return pull(args.source, tracking_uri=args.tracking_uri, out_dir=tmp).model

        text = cls.init_recipe(source=args.source, output=out, data=data, edge_name=f"{m['name']}-edge",
                               splits=splits, load_model=load_model)
    out.write_text(text)
    load_recipe(out)  # what init writes, run accepts
    print(f"wrote {out}")
    return 0


def _cluster_recipe(path: str | None, args: argparse.Namespace):
    """The recipe (default: the demo's) with the command line's overrides (``--source``, secrets)."""
    import dataclasses

    from edgeslim.components.common.tracking import MODEL_URI
    from edgeslim.components.recipe import load_recipe
    from edgeslim.pipelines.demo import DEMO_RECIPE

    if path is None and args.source is not None:
        raise ConfigError("--source: it overrides a recipe's source; add --recipe RECIPE.yaml")
    recipe = load_recipe(path or DEMO_RECIPE)
    if args.source is not None:
        if not MODEL_URI.match(args.source):
            raise ConfigError(f"--source: got {args.source!r}; use a registry URI 'models:/NAME/VERSION' "
                              "or 'models:/NAME@ALIAS'")
        recipe = recipe.with_overrides(source=args.source)
    secrets = {k: getattr(args, k) for k in ("mlflow_secret", "s3_secret") if getattr(args, k) is not None}
    if secrets:
        recipe = recipe.with_overrides(cluster=dataclasses.replace(recipe.cluster, **secrets))
    return recipe


def _images(args: argparse.Namespace) -> dict:
    from edgeslim.components.kfp.ops import DEFAULT_ENGINE_IMAGE, DEFAULT_IMAGE, DEFAULT_TRAIN_IMAGE

    return {"base_image": args.base_image or DEFAULT_IMAGE, "engine_image": args.engine_image or DEFAULT_ENGINE_IMAGE,
            "train_image": args.train_image or DEFAULT_TRAIN_IMAGE}


def cmd_compile(args: argparse.Namespace) -> int:
    from edgeslim.pipelines.edge_compression import compile_pipeline

    out = compile_pipeline(args.output, recipe=_cluster_recipe(args.recipe, args),
                           recipe_default=args.recipe is not None, **_images(args))
    print(f"wrote {out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import os

    from edgeslim.pipelines.edge_compression import build_pipeline, follow_run, submit_run

    recipe = _cluster_recipe(args.recipe, args)
    uri = args.tracking_uri or recipe.tracking_uri
    # Laid out here, before anything is sent: a recipe Kubernetes cannot place fails in this process.
    pipeline = build_pipeline(recipe=recipe, **_images(args))
    client, run_id, url = submit_run(
        pipeline, host=args.host, token=args.token or os.environ.get("KFP_TOKEN") or None,
        arguments={"recipe_json": recipe.to_json(), "tracking_uri": uri or ""},
        experiment=args.experiment, namespace=args.namespace, run_name=f"edgeslim {recipe.source}",
    )
    print(f"submitted run {run_id}: {url}", flush=True)
    if not args.wait:
        return 0
    try:
        state = follow_run(client, run_id, url, host=args.host, timeout=args.timeout, poll=args.poll,
                           progress=_progress)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM stop the following, not the run
        print(f"edgeslim: stopped following run {run_id}; it goes on at {url}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    print(f"run {run_id} {state.lower()}: {url}")
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    from edgeslim.components.common.tracking import resolve_tracking_uri
    from edgeslim.deploy.webhook_tls import TlsFiles, check_url
    from edgeslim.pipelines import trigger

    secret = os.environ.get("EDGESLIM_WEBHOOK_SECRET", "")
    if not secret:
        raise ConfigError("set EDGESLIM_WEBHOOK_SECRET to the secret given to MLflow's create_webhook")
    tls = TlsFiles(args.tls_cert, args.tls_key) if (args.tls_cert or args.tls_key) else None
    if args.url:
        check_url(args.url)
    recipe = _cluster_recipe(args.recipe, args)  # the recipe, with --mlflow-secret/--s3-secret
    uri = resolve_tracking_uri(args.tracking_uri or recipe.tracking_uri or None)
    recipe = recipe.with_overrides(tracking_uri=uri)
    if args.runner == "kfp":
        if not args.host:
            raise ConfigError("--runner kfp needs --host URL, the KFP UI or API (in a cluster: "
                              "http://ml-pipeline.kubeflow.svc.cluster.local:8888)")
        run = trigger.kfp_runner(recipe, host=args.host, tracking_uri=uri, experiment=args.experiment,
                                 namespace=args.namespace, token=args.token, images=_images(args))
    else:
        run = trigger.local_runner(recipe, tracking_uri=uri, workdir=args.workdir, preflight=_preflight)
    return trigger.serve(recipe, run=run, runner=args.runner, models=list(dict.fromkeys(args.model)), alias=args.alias,
                         tracking_uri=uri, secret=secret, host=args.listen,
                         port=args.port, queue_size=args.queue_size, read_timeout=args.read_timeout,
                         recipe_label=args.recipe, tls=tls, url=args.url)
