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
    p.add_argument("--npz", default=None, help="an .npz (local or s3://) with x_/y_ train/val/test arrays")
    p.add_argument("--data", default=None, metavar="PROVIDER",
                   help="another data provider: imagefolder, yolo, coco or one of yours (with --data-arg)")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of --data's provider, e.g. root=s3://bucket/images (repeatable)")
    p.add_argument("--preprocess", choices=("auto", "imagenet", "yolo", "none"), default="auto",
                   help="how images become inputs (data.preprocess): imagenet (resize 256, crop 224, ImageNet "
                   "mean/std), yolo (letterbox 640, 0-1); auto (default): yolo for yolo/coco, imagenet for imagefolder")
    p.add_argument("--task", choices=("auto", "classification", "detection"), default="auto",
                   help="auto (default): detection when the data's labels are boxes, else classification")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI, to read a detector's output shapes (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("-o", "--output", default="recipe.yaml", help="file to write (default recipe.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    def cluster_args(p) -> None:
        p.add_argument("--source", default=None, help="models:/NAME/VERSION (or @ALIAS): overrides the recipe's source")
        p.add_argument("--base-image", default=None, help="image of the CPU tasks, edgeslim installed "
                       "(deploy/images/Containerfile)")
        p.add_argument("--engine-image", default=None, help="image of the engine tasks, TensorRT installed "
                       "(deploy/images/Containerfile.tensorrt)")
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
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--queue-size", type=int, default=16, help="versions that may wait (then 503: MLflow retries)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="seconds a client has to send its request")
    p.set_defaults(func=cmd_trigger, source=None)


def _preflight(recipe, tracking_uri: str, workdir: Path) -> None:
    """Catch bad input in this process, with one clear line, before any task starts."""
    from edgeslim.components.export import check_model_accepts
    from edgeslim.components.pull import pull
    from edgeslim.components.common.data import load_data

    data = load_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess)
    res = pull(recipe.source, tracking_uri=tracking_uri, out_dir=workdir / "preflight")
    check_model_accepts(res.model, data.x_test[:4])
    from edgeslim.components.task import task_for

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
    _progress(f"checking {recipe.source} on {tracking_uri}")
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
        trained = train(progress=_progress) if fresh else None
        server.wait_ready()
        _progress(f"MLflow at {server.uri}")
        client = connect(server.uri)
        ensure(client, progress=_progress, trained=trained)
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


INIT_TEMPLATE = """\
# edgeslim recipe for {source}
# Written by `edgeslim init`; run it with `edgeslim run {output}`.
# Every key is documented in the README ("Recipe format").
version: 1

# The registered PyTorch model to compress (logged with mlflow.pytorch.log_model,
# serialization_format="pickle" if you will distil or prune it).
source: {source}

# Calibration draws from train only; the gate judges on test.
data:
{data}

# Stages in order; distill/prune (if any) first, the one quantize stage last.
stages:
  - export: {{opset: 18}}            # ONNX, dynamic batch, checked against torch
  - quantize:
      method: ptq                    # symmetric int8, per-channel weights: what TensorRT wants
      calibrator: percentile         # minmax | entropy | percentile | mse
      percentile: 99.99
      num_samples: 512
      num_bins: 2048
      float_layers: []               # ONNX node names or patterns kept in float

# A candidate that misses any check is not registered; `edgeslim run` exits 3.
gate:
  max_metric_drop: 1.0               # points of top-1
  min_top1_agreement: 0.97           # share of test samples whose top-1 matches the parent
  min_sqnr_db: 15.0                  # output SQNR against the parent

evaluate:
  latency_batches: [1, 32]
  latency_warmup: 5
  latency_repeats: 30

register:
  name: "{edge_name}"
  alias: edge-candidate
  experiment: edgeslim
"""


DETECT_INIT_TEMPLATE = """\
# edgeslim recipe for the detector {source}
# Written by `edgeslim init`; run it with `edgeslim run {output}`.
# Every key is documented in the README ("Recipe format", "Detectors").
version: 1

source: {source}

# Detection labels: y_* are object arrays, y[i] a (k, 5) [x1, y1, x2, y2, class] array in pixels.
data:
{data}

stages:
  - export: {{opset: 18}}
  - quantize:
      method: auto                   # PTQ per calibrator, then sensitive head layers kept in float
      calibrators: [percentile, entropy, mse, minmax]
      num_samples: 512
      max_float_layers: 3
      qat: false                     # true: QAT last, trained label-free to match the fp32 outputs (slow on CPU)
      placement: weighted            # Q/DQ only on conv inputs (TensorRT's placement): score outputs stay float
      float_layers: []               # ONNX node names or patterns always kept in float

# Read from the model's outputs on {n_probe} validation image(s): {outputs}
task:
  kind: detection
  num_classes: {num_classes}                  # {num_classes_why}
  score_threshold: 0.25              # your deployment threshold: precision/recall are reported at it
  decoder:
{decoder_layout}
    scores: {scores}                 # {scores_why}
    nms_iou: 0.5
    min_score: 0.01
    max_detections: 100
{heads}  # decode_fn: mypkg.decoders:decode   # instead of decoder: outputs -> per image (M, 6) [x1, y1, x2, y2, score, class]
  # loss_fn: mypkg.losses:loss       # distill/prune's label loss: loss_fn(outputs, targets, model) -> scalar tensor
  #                                  # (default: an Ultralytics model's own v8DetectionLoss, or edgeslim's for map pairs)
  gate:
    max_map_drop: 1.0                # points of mAP@0.5
    max_map50_95_drop: 2.0           # points of mAP@0.5:0.95: catches boxes that lost precision
    max_tp_score_drop: 0.05          # mean true-positive score: catches collapsed confidence
    max_recall_drop: 2.0             # points of recall at score_threshold
    min_recall: 0.0

evaluate:
  latency_batches: [1, 8]
  latency_warmup: 3
  latency_repeats: 10

register:
  name: "{edge_name}"
  alias: edge-candidate
  experiment: edgeslim
"""


def _detector_task_fields(source: str, data, tracking_uri: str | None) -> dict[str, str]:
    """num_classes from the labels; heads and score activation from the model's outputs."""
    import tempfile

    import numpy as np
    import torch

    from edgeslim.components.common.decode import infer_decoder
    from edgeslim.components.common.model_outputs import forward_tensors, output_names
    from edgeslim.components.pull import pull

    classes = [int(c) for y in data.y_train for c in np.asarray(y)[:, 4]]
    if not classes:
        raise ConfigError("the training labels hold no boxes; detection needs labelled objects")
    num_classes = max(classes) + 1
    probe = data.x_val[:2] if len(data.x_val) else data.x_train[:2]
    with tempfile.TemporaryDirectory(prefix="edgeslim-init-") as tmp:
        model = pull(source, tracking_uri=tracking_uri, out_dir=tmp).model.eval()
        outs = forward_tensors(model, torch.from_numpy(np.ascontiguousarray(probe, dtype=np.float32)))
    names = output_names(len(outs))
    shapes = [list(o.shape) for o in outs]
    stride = getattr(model, "stride", None)  # Ultralytics models carry their strides
    model_strides = [float(v) for v in np.asarray(stride, dtype=np.float64).reshape(-1)] \
        if isinstance(stride, (torch.Tensor, list, tuple)) else []
    dec = infer_decoder(names, shapes, probe.shape[-2:], num_classes,
                        [s for s in model_strides if s.is_integer()] if len(model_strides) > 1 else [])
    fields = {"num_classes": str(num_classes), "num_classes_why": "from the labels (largest class + 1)"}
    if dec["format"] == "yolo-decoded":
        score_maps = [outs[names.index(dec["output"])][:, 4:].numpy()]
        strides = f"[{', '.join(str(s) for s in dec['strides'])}]"
        fields["decoder_layout"] = (
            "    format: yolo-decoded             # one (N, 4+classes, A) output: cx, cy, w, h in pixels, then scores\n"
            f"    output: {dec['output']}\n"
            f"    strides: {strides:<22}  # the levels' strides (fine-tuning uses them)")
        fields["heads"] = ""
        if dec["num_classes"] != num_classes:
            fields["num_classes"] = str(dec["num_classes"])
            fields["num_classes_why"] = (f"from the model's output ({shapes[0][1]} channels: 4 box values + classes); "
                                         f"the labels use {num_classes}")
    else:
        score_maps = [outs[names.index(h["cls"])].numpy() for h in dec["heads"]]
        fields["decoder_layout"] = (
            "    box_encoding: ltrb               # ltrb: distances from the cell centre in strides; "
            "xywh: offset + log size")
        fields["heads"] = "    heads:\n" + "\n".join(
            f"      - {{box: {h['box']}, cls: {h['cls']}, stride: {h['stride']}}}" for h in dec["heads"]) + "\n"
    bounded = all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in score_maps)
    return {
        **fields, "n_probe": str(len(probe)),
        "outputs": ", ".join(f"{n} {s}" for n, s in zip(names, shapes)),
        "scores": "sigmoid" if bounded else "logits",
        "scores_why": ("the class scores stay in [0, 1]: the graph ends in a sigmoid" if bounded else
                       "the class scores leave [0, 1]: raw logits, the decoder applies the sigmoid"),
    }


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
    preset = args.preprocess if args.preprocess != "auto" else IMAGE_PROVIDERS.get(provider, "none")
    preprocess = PREPROCESS_PRESETS.get(preset)
    if not provider:
        return ("  provider: sklearn-digits        # or: provider: npz / args: {path: data.npz}\n"
                "  args: {seed: 0}"), "", {}, None
    lines = [f"  provider: {provider}", f"  args: {json.dumps(kwargs)}"]
    if preprocess:
        lines.append(f"  preprocess: {json.dumps(preprocess)}   # how an image becomes the model's input "
                     "(README, data.preprocess)")
    return "\n".join(lines), provider, kwargs, preprocess


def cmd_init(args: argparse.Namespace) -> int:
    from edgeslim.components.common.tracking import MODEL_URI
    from edgeslim.components.recipe import load_recipe

    m = MODEL_URI.match(args.source)
    if not m:
        raise ConfigError(f"--source {args.source!r}: use 'models:/NAME@ALIAS' or 'models:/NAME/VERSION'")
    out = Path(args.output)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it or -o another file")
    task = args.task
    splits = None
    data, provider, kwargs, preprocess = _init_data(args)
    where = f"--npz {args.npz}" if args.npz else f"--data {provider}"
    if provider:
        if task != "classification":
            from edgeslim.components.common.errors import DataError
            from edgeslim.components.common.data import load_data

            try:
                splits = load_data(provider, kwargs, preprocess)
            except DataError as exc:
                if task == "detection":
                    raise
                # auto: the data may live where only the pipeline can read it; say what was assumed
                print(f"edgeslim: note: could not read {where} to see its labels ({exc}); wrote a "
                      "classification recipe; pass --task detection if the labels are boxes", file=sys.stderr)
                task = "classification"
        if task != "classification" and splits is not None:
            boxes = splits.y_train.dtype == object
            if task == "detection" and not boxes:
                raise ConfigError(f"{where}: y_train holds class labels, not boxes; detection needs "
                                  "y_* object arrays of (k, 5) [x1, y1, x2, y2, class] arrays")
            task = "detection" if boxes else "classification"
    elif task == "detection":
        raise ConfigError("--task detection needs detection data: --npz PATH (y_* object arrays of (k, 5) "
                          "[x1, y1, x2, y2, class] arrays in pixels) or --data yolo|coco with --data-arg")
    common = {"source": args.source, "data": data, "output": out, "edge_name": f"{m['name']}-edge"}
    if task == "detection":
        text = DETECT_INIT_TEMPLATE.format(**common, **_detector_task_fields(args.source, splits, args.tracking_uri))
    else:
        text = INIT_TEMPLATE.format(**common)
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
    from edgeslim.pipelines import trigger

    secret = os.environ.get("EDGESLIM_WEBHOOK_SECRET", "")
    if not secret:
        raise ConfigError("set EDGESLIM_WEBHOOK_SECRET to the secret given to MLflow's create_webhook")
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
                         recipe_label=args.recipe)
