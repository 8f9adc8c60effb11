"""Thin Kubeflow components around the stages, one per stage.

Each function body imports edgeslim from the image it runs in, turns its
inputs into plain objects, calls the stage and writes the outputs. The
components are built by :func:`make_ops` so that the base image is a
parameter; ``kfp.local.SubprocessRunner(use_venv=False)`` runs the same
functions on a laptop.
"""


from types import SimpleNamespace  # noqa: I001  (no __future__ annotations: KFP reads them)
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Input, Markdown, Metrics, Model, Output

from edgeslim.components.common.version import __version__

# Built from deploy/images/ (docs/kubeflow.md): Containerfile (CPU; amd64 and arm64 under one
# tag), Containerfile.tensorrt (x86_64: TensorRT 10.3 on NVIDIA's TensorRT image, another BASE for 11.x),
# Containerfile.jetson (arm64, NVIDIA's L4T JetPack image of each JetPack release), and Containerfile
# with a CUDA torch (GPU training); tagged with this release's version.
IMAGE_REPOSITORY = "ghcr.io/edgeslim/edgeslim"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
DEFAULT_ENGINE_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-tensorrt10.3"
DEFAULT_TRAIN_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cuda"


def platform_image(device_class) -> str:
    """The released image of a class's platform: ``-jetpack6.1`` (arm64 L4T) or ``-tensorrt11`` (x86_64)."""
    tag = f"jetpack{device_class.jetpack}" if device_class.is_jetson else f"tensorrt{device_class.tensorrt_major}"
    return f"{IMAGE_REPOSITORY}:{__version__}-{tag}"


def pull_op(recipe_json: str, tracking_uri: str, model: Output[Model], parent: Output[Artifact]):
    """Pull the source model named by the recipe from the MLflow registry."""
    import json
    from pathlib import Path

    from edgeslim.components.common.model_io import save_module
    from edgeslim.components.recipe import recipe_from_json
    from edgeslim.components.pull import pull

    recipe = recipe_from_json(recipe_json)
    res = pull(recipe.source, tracking_uri=tracking_uri or recipe.tracking_uri or None,
               out_dir=Path(model.path).parent / "download")
    save_module(res.model, model.path)
    Path(parent.path).write_text(json.dumps({**res.lineage, "seconds": res.seconds}))
    model.metadata.update({"name": res.lineage["name"], "version": res.lineage["version"]})


def export_op(recipe_json: str, model: Input[Model], onnx_model: Output[Model], info: Output[Artifact]):
    """Export a torch module to ONNX (dynamic batch, pinned opset), checked against torch."""
    import json
    from pathlib import Path

    from edgeslim.components.common.model_io import load_module
    from edgeslim.components.recipe import recipe_from_json
    from edgeslim.components.export import export
    from edgeslim.components.common.data import load_data

    recipe = recipe_from_json(recipe_json)
    data = load_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess)
    res = export(load_module(model.path), recipe.export, data=data, out_path=onnx_model.path)
    Path(info.path).write_text(json.dumps({**res.metrics, "seconds": res.seconds}))


def transform_op(recipe_json: str, model: Input[Model], student: Output[Model], info: Output[Artifact],
                 metrics: Output[Metrics]):
    """Apply the recipe's torch stages (distill, prune) in the order written.

    ``info`` holds the stages' metrics and ``training_curve``, the mean loss of every epoch per stage
    (the report logs it to MLflow); ``metrics`` (KFP) the MACs and parameters before and after.
    """
    import json
    import math
    import shutil
    from pathlib import Path

    from edgeslim.components.common.model_io import load_module, save_module
    from edgeslim.components.recipe import recipe_from_json

    recipe = recipe_from_json(recipe_json)
    if not recipe.torch_stages:
        shutil.copyfile(model.path, student.path)
        Path(info.path).write_text(json.dumps({"stages": [], "seconds": 0.0, "training_curve": []}))
        metrics.log_metric("stages", 0)
        return
    from edgeslim.components.common import progress
    from edgeslim.components.common.data import load_data
    from edgeslim.components.common.tasks import task_for
    from edgeslim.components.transform.train import epoch_losses

    data = load_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess)
    # Every fit() reports its epochs to `losses`; each stage's progress call claims the epochs before it.
    names = [s.stage for s in recipe.torch_stages]
    curve, claimed, tick = [], [0], progress.epochs("transform")

    def on_stage(label, step, steps, loss):
        head = str(label).split(":", 1)[0]  # "2:prune(channel)": the stage's place in the recipe
        i = int(head) - 1 if head.isdigit() and 0 < int(head) <= len(names) else None
        stage = str(label) if i is None else names[i] if names.count(names[i]) == 1 else f"{names[i]}_{i + 1}"
        done = sum(1 for c in curve if c["stage"] == stage)
        curve.extend({"stage": stage, "epoch": done + k + 1, "loss": v} for k, v in enumerate(losses[claimed[0]:]))
        claimed[0] = len(losses)
        tick(label, step, steps, loss)

    with epoch_losses() as losses:
        res = task_for(recipe.task).transform(load_module(model.path), recipe.torch_stages, data=data,
                                              progress=on_stage)
    save_module(res.model, student.path)
    Path(info.path).write_text(json.dumps({**res.metrics, "seconds": res.seconds, "training_curve": curve},
                                          default=str))
    metrics.log_metric("stages", len(recipe.torch_stages))
    for k in ("macs_before", "macs_after", "macs_ratio", "params_before", "params_after", "params_ratio"):
        if isinstance(res.metrics.get(k), (int, float)):
            metrics.log_metric(k, float(res.metrics[k]))
    for stage in dict.fromkeys(c["stage"] for c in curve):
        last = [c for c in curve if c["stage"] == stage][-1]
        if math.isfinite(last["loss"]):
            metrics.log_metric(f"{stage}_final_loss", round(last["loss"], 6))
            metrics.log_metric(f"{stage}_epochs", last["epoch"])
    metrics.log_metric("seconds", round(res.seconds, 2))


def quantize_op(recipe_json: str, tracking_uri: str, onnx_model: Input[Model], student: Input[Model],
                parent_onnx: Input[Model], qdq_model: Output[Model], info: Output[Artifact],
                metrics: Output[Metrics]):
    """Quantize to a symmetric per-channel int8 Q/DQ ONNX.

    ``info`` holds the method's metrics (the search's trials), ``training_curve`` (QAT's mean loss per
    epoch) and ``mlflow_run_id`` (the search's run); ``metrics`` (KFP) the trial count, the chosen
    candidate's figures and each calibrator's PTQ figures.
    """
    import json
    import math
    import shutil
    from pathlib import Path

    from edgeslim.components.recipe import recipe_from_json
    from edgeslim.components.common.data import load_data
    from edgeslim.components.common import progress
    from edgeslim.components.transform.train import epoch_losses

    recipe = recipe_from_json(recipe_json)
    data = load_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess)
    out_dir = Path(qdq_model.path).parent / "quantize"
    cfg = recipe.quantize
    from edgeslim.components.common.model_io import load_module
    from edgeslim.components.quantize.apply import quantize

    run_id = None
    # Only QAT trains here (method qat, or the search's last trial): its epochs are the curve.
    with epoch_losses(progress.epochs("quantize qat")) as losses:
        if cfg.method == "ptq":  # no training, no trials: nothing to track
            res = quantize(onnx_model.path, cfg, data=data, out_dir=out_dir)
        else:
            import mlflow

            from edgeslim.components.common.tracking import connect
            from edgeslim.components.common.tasks import task_for

            uri = tracking_uri or recipe.tracking_uri or None
            connect(uri)
            mlflow.set_experiment(recipe.register.experiment)
            # Only QAT trains the torch model (method qat, or the search's last trial): load it only then.
            model = load_module(student.path) if cfg.method == "qat" or getattr(cfg, "qat", False) else None
            # Trials judge the int8 step, so their reference is the model being quantized
            # (the final gate still compares the metric with the registered parent).
            reference = onnx_model.path if recipe.torch_stages else parent_onnx.path
            strategy = task_for(recipe.task).search_strategy(fp32_onnx=onnx_model.path, reference_onnx=reference,
                                                             recipe=recipe, model=model) \
                if cfg.method in ("auto", "qat") else None
            with mlflow.start_run(run_name=f"quantize {cfg.method}: {recipe.source}") as run:
                mlflow.set_tag("edgeslim.recipe_hash", recipe.digest())
                run_id = run.info.run_id
                res = quantize(onnx_model.path, cfg, data=data, out_dir=out_dir, model=model, strategy=strategy,
                               export_config=recipe.export, tracking_uri=uri, parent_run_id=run.info.run_id)
    from edgeslim.components.quantize.ptq import check_qdq

    # Whatever method made it, the report states the Q/DQ facts TensorRT cares about.
    res.metrics.update({k: v for k, v in check_qdq(res.model).items() if k not in res.metrics})
    shutil.copyfile(res.model, qdq_model.path)
    curve = [{"stage": "qat", "epoch": i + 1, "loss": v} for i, v in enumerate(losses)]
    Path(info.path).write_text(json.dumps({**res.metrics, "seconds": res.seconds, "training_curve": curve,
                                           "mlflow_run_id": run_id}, default=str))

    def log(name, value):
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            metrics.log_metric(name, float(value))

    trials = res.metrics.get("trials") or []
    log("trials", len(trials))
    for k, v in res.metrics.items():  # the method's own numeric figures (size, samples, QAT top-1s, ...)
        log(k, v)
    if "float_layers" in res.metrics:  # PTQ's and QAT's nodes kept in float (the search's: chosen_float_layers)
        log("float_layers", len(res.metrics["float_layers"] or []))
    winner = res.metrics.get("winner") or {}
    for k, v in winner.items():
        if k not in ("mlflow_run_id", "passed"):
            log(f"chosen_{k}", v)
    if winner:
        log("chosen_float_layers", len(winner.get("float_layers") or []))
    for row in trials:  # each calibrator's PTQ trial, side by side in the KFP UI
        if row.get("kind") == "ptq":
            for k, v in row.items():  # the task strategy's judged figures (bookkeeping left out)
                if k not in ("trial", "seconds", "size_bytes", "screened_on") and not isinstance(v, bool):
                    log(f"ptq_{row['calibrator']}_{k}", v)
    if curve:
        log("qat_final_loss", round(curve[-1]["loss"], 6))
    log("seconds", round(res.seconds, 2))


def evaluate_op(recipe_json: str, qdq_model: Input[Model], parent_onnx: Input[Model],
                student_onnx: Input[Model], parent_export: Input[Artifact], student_export: Input[Artifact],
                evaluation: Output[Artifact], metrics: Output[Metrics], confusion: Output[ClassificationMetrics]):
    """Evaluate the candidate beside its parent on the test split (ONNX Runtime, CPU).

    ``evaluation`` also holds ``figures`` (the int8 output error against its fp32 model and a
    detector's precision-recall curves, for the report's charts), and each side's ``macs`` and
    ``params`` as the exports counted them (the candidate's are those of the fp32 model it was quantized
    from: int8 changes how weights are stored, not how many there are or the MACs); ``metrics`` (KFP)
    the task metric, agreement, SQNR, size, MACs, parameters and latency of both, and each gated drop's
    interval (``<drop>_low``, ``<drop>_high``, at the gate's confidence or 95%); ``confusion`` (KFP) a
    classifier candidate's confusion matrix on the test split (up to 100 classes; the KFP UI draws it).
    """
    import json
    import math
    from pathlib import Path

    from edgeslim.components.recipe import recipe_from_json
    from edgeslim.components.common.data import load_data
    from edgeslim.components.common.memory import return_large_buffers
    from edgeslim.components.common.tasks import task_for

    return_large_buffers()  # the evaluation frees a batch's buffers per model and batch: its peak follows them
    recipe = recipe_from_json(recipe_json)
    data = load_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess)
    student = student_onnx.path if recipe.torch_stages else None
    task = task_for(recipe.task)
    res = task.evaluate(qdq_model.path, recipe.evaluate, parent_onnx=parent_onnx.path, data=data,
                                         student_onnx=student)
    res.metrics["student_fp32_size_bytes"] = Path(student_onnx.path).stat().st_size
    for who, info in (("source", parent_export), ("candidate", student_export)):
        counted = json.loads(Path(info.path).read_text())
        res.metrics[who].update({k: counted[k] for k in ("macs", "params") if k in counted})
    if "figures" not in res.metrics:  # the built-in evaluators measure them in their own pass over the split
        try:
            res.metrics["figures"] = task.figures(qdq_model.path, parent_onnx=parent_onnx.path, data=data,
                                                  student_onnx=student)
        except Exception as exc:  # a chart must not cost the compression: the report says what went wrong
            res.metrics["figures"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    Path(evaluation.path).write_text(json.dumps({**res.metrics, "seconds": res.seconds}))

    def log(name, value):
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            metrics.log_metric(name, float(value))

    src, cand = res.metrics["source"], res.metrics["candidate"]
    name = res.metrics.get("metric_name", "top1")
    log(f"source_{name}", src["metric"])
    log(f"candidate_{name}", cand["metric"])
    log(f"{name}_drop", round(src["metric"] - cand["metric"], 4))
    for k, v in cand["fidelity"].items():  # agreement, SQNR (against the parent and against its fp32 model)
        log(k, v)
    log("source_size_bytes", src["size_bytes"])
    log("candidate_size_bytes", cand["size_bytes"])
    log("size_ratio", cand.get("size_ratio"))
    for who, sec in (("source", src), ("candidate", cand)):
        log(f"{who}_macs", sec.get("macs"))
        log(f"{who}_params", sec.get("params"))
        for b, ms in (sec.get("latency_ms") or {}).items():
            log(f"{who}_latency_ms_{b}", ms)
        for k, v in task.logged_metrics(sec).items():  # the task's own figures (a detector's mAP@0.5:0.95, ...)
            log(f"{who}_{k}", v)
    for k in ("cpu_int8_kernel_metric", "cpu_int8_kernel_qdq_metric", "cpu_int8_kernel_samples"):
        log(k, cand.get(k))
    from edgeslim.components.common.confidence import REPORT_LEVEL, interval

    for drop, stat in (res.metrics.get("confidence") or {}).items():  # each gated drop's interval on test
        iv = interval(stat, getattr(recipe.applied_gate, "confidence", None) or REPORT_LEVEL)
        log(f"{drop}_low", iv["low"])
        log(f"{drop}_high", iv["high"])
    if cand.get("confusion_matrix"):
        cm = cand["confusion_matrix"]
        confusion.log_confusion_matrix([str(i) for i in range(len(cm))], cm)


def gate_op(recipe_json: str, evaluation: Input[Artifact], verdict: Output[Artifact],
            verdict_md: Output[Markdown]) -> bool:
    """Check the accuracy gate; the pipeline branches on the returned bool. ``verdict_md`` is the
    verdict as a Markdown table (the KFP UI shows it)."""
    import json
    from pathlib import Path

    from edgeslim.components.recipe import recipe_from_json
    from edgeslim.components.common.tasks import task_for

    recipe = recipe_from_json(recipe_json)
    result = task_for(recipe.task).gate(json.loads(Path(evaluation.path).read_text()), recipe)
    Path(verdict.path).write_text(json.dumps(result))

    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [f"## Gate: {'passed' if result['passed'] else 'FAILED'}", "", cell(result["summary"]), "",
             "| check | value | threshold | result | detail |", "|---|---:|---:|---|---|"]
    lines += [f"| {cell(c['name'])} | {c['value']:.4g} | {c['threshold']:.4g} | "
              f"{'pass' if c['passed'] else '**FAIL**'} | {cell(c['detail'])} |" for c in result["checks"]]
    Path(verdict_md.path).write_text("\n".join(lines) + "\n")
    return bool(result["passed"])


def plan_engines_op(recipe_json: str, parent: Input[Artifact], verdict: Input[Artifact],
                    plan: Output[Artifact]):
    """What every engine task needs, from the recipe, as one JSON artifact.

    When the gate failed the device-class list is empty, so engine tasks build
    nothing. ``previous_model_uri`` names the edge model registered before, whose
    timing cache for a class seeds its new build.
    """
    import dataclasses
    import json
    from pathlib import Path

    from edgeslim.components.recipe import recipe_from_json

    recipe = recipe_from_json(recipe_json)
    cfg = recipe.engines
    if not json.loads(Path(verdict.path).read_text())["passed"]:
        cfg = dataclasses.replace(cfg, device_classes=[], node_selectors={}, min_tensorrt={}, images={})
    name = recipe.register.model_name(json.loads(Path(parent.path).read_text())["name"])
    Path(plan.path).write_text(json.dumps({
        "engines_config": cfg.to_dict(), "data_provider": recipe.data.provider, "data_args": recipe.data.args,
        "data_preprocess": recipe.data.preprocess.to_dict() if recipe.data.preprocess else None,
        "previous_model_uri": f"models:/{name}@{recipe.register.alias}",
        "task": recipe.task.metadata(),  # the task judges the engine's outputs
    }))


def engine_build_op(qdq_model: Input[Model], device_class: str, plan: Input[Artifact],
                    engines: Output[Model]) -> str:
    """Build and verify the TensorRT engine of one device class (on a GPU node of that class).

    Returns ``{device_class, status, path, uri}`` for the register task as base64 of its JSON: the
    register task takes every class's string in one list parameter, which the runners write into a JSON
    list as the strings stand, so the string must hold no quotes.
    """
    import base64
    import json
    from pathlib import Path

    p = json.loads(Path(plan.path).read_text())
    if device_class not in p["engines_config"]["device_classes"]:
        status = "not built: the candidate failed its gate"
    else:
        from edgeslim.components.engine.stage import build_engine_task

        status = build_engine_task(qdq_model.path, device_class, p["engines_config"],
                                   data_provider=p["data_provider"], data_args=p["data_args"],
                                   data_preprocess=p.get("data_preprocess"),
                                   out_dir=engines.path, previous_model_uri=p["previous_model_uri"],
                                   task=p.get("task"))["status"]
        engines.metadata.update({"device_class": device_class, "status": status})
    print(f"engine {device_class}: {status}")
    return base64.b64encode(json.dumps({"device_class": device_class, "status": status, "path": engines.path,
                                        "uri": engines.uri}).encode()).decode()


def register_op(recipe_json: str, tracking_uri: str, qdq_model: Input[Model], parent: Input[Artifact],
                evaluation: Input[Artifact], verdict: Input[Artifact], engines: List[str]) -> str:
    """Register the gated candidate as a new version of ``<parent>-edge`` with its lineage.

    Returns the registration as JSON (a parameter: the local runner's ``OneOf`` takes parameters).
    """
    import base64
    import json
    from pathlib import Path

    from edgeslim.components.recipe import recipe_from_json
    from edgeslim.components.register import register
    from edgeslim.components.common.data import describe_data, load_data

    recipe = recipe_from_json(recipe_json)
    data = load_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess)
    q = recipe.quantize
    # a few rows stand for the calibration set where MLflow wants an array; the lineage says how many
    calib, calib_lineage = data.calibration_profile(getattr(q, "num_samples", 512), getattr(q, "seed", 0))
    res = register(
        qdq_model.path, parent=json.loads(Path(parent.path).read_text()), recipe=recipe,
        evaluation=json.loads(Path(evaluation.path).read_text()),
        gate_result=json.loads(Path(verdict.path).read_text()), calibration=calib, calibration_lineage=calib_lineage,
        data_description=describe_data(recipe.data.provider, recipe.data.args, recipe.data.preprocess),
        tracking_uri=tracking_uri or recipe.tracking_uri or None,
        engines=[json.loads(base64.b64decode(e)) for e in engines],  # each engine task's base64 JSON
    )
    return json.dumps({**res.metrics, "seconds": res.seconds})


def reject_op(verdict: Input[Artifact]) -> str:
    """The gate failed: nothing is registered; say so for the report."""
    import json
    from pathlib import Path

    summary = json.loads(Path(verdict.path).read_text())["summary"]
    return json.dumps({"rejected": summary, "seconds": 0.0})


def report_op(recipe_json: str, tracking_uri: str, parent: Input[Artifact], parent_export: Input[Artifact],
              quantized: Input[Artifact], evaluation: Input[Artifact],
              verdict: Input[Artifact], registered: str, qdq_model: Input[Model],
              report: Output[Artifact], html: Output[dsl.HTML], transform: Input[Artifact] = None,
              kfp_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
              kfp_run_name: str = dsl.PIPELINE_JOB_NAME_PLACEHOLDER):
    """Assemble report.json and the HTML report (with its charts), and log both to MLflow.

    ``kfp_run_id``/``kfp_run_name``: the KFP run, for the tags that link it. Kubeflow's local runner
    fills these defaults in; a cluster fills in placeholders passed as task arguments, not defaults, so
    there the run id comes from ``$KFP_RUN_ID`` or, failing that, from the report's artifact URI
    (``<pipeline root>/<pipeline>/<run id>/<task>/...``). ``transform`` is absent from a pipeline laid
    out without torch stages.
    """
    import json
    import os
    import re
    from pathlib import Path

    from edgeslim.components.recipe import recipe_from_json
    from edgeslim.components.report import build_report
    from edgeslim.components.report_render import log_report, render_html

    def read(a):
        return json.loads(Path(a.path).read_text())

    def given(v):
        return v if v and "{{$" not in v else ""

    uuid = re.search(r"/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/", report.uri or "")
    kfp_run = {"run_id": given(kfp_run_id) or os.environ.get("KFP_RUN_ID", "") or (uuid.group(1) if uuid else ""),
               "run_name": given(kfp_run_name) or os.environ.get("KFP_RUN_NAME", "")}
    recipe = recipe_from_json(recipe_json)
    rep = build_report(
        recipe=recipe, parent=read(parent), parent_export=read(parent_export),
        transform=read(transform) if transform is not None else {"stages": [], "seconds": 0.0, "training_curve": []},
        quantized=read(quantized), evaluation=read(evaluation), verdict=read(verdict),
        registered=registered if isinstance(registered, dict) else json.loads(registered),
        onnx_path=qdq_model.path, kfp_run={k: v for k, v in kfp_run.items() if v},
    )
    Path(report.path).write_text(json.dumps(rep, indent=2))
    Path(html.path).write_text(render_html(rep))
    log_report(rep, report.path, html.path, tracking_uri=tracking_uri or recipe.tracking_uri or None,
               experiment=recipe.register.experiment)
    # A run `edgeslim trigger` submitted: its ledger on the parent version says how it ended.
    from edgeslim.components.common.tracking import connect
    from edgeslim.deploy.trigger import settle_submitted

    try:
        state = settle_submitted(connect(tracking_uri or recipe.tracking_uri or None), recipe, rep)
    except Exception as exc:  # the report stands; the ledger keeps saying "submitted"
        print(f"warning: the trigger ledger of {recipe.source} was not settled: {' '.join(str(exc).split())[:300]}")
    else:
        if state:
            print(f"trigger ledger of {recipe.source}: {state}")


def make_ops(base_image: str = DEFAULT_IMAGE, *, images: dict | None = None) -> SimpleNamespace:
    """The KFP components, built on ``base_image`` (an image with edgeslim installed).

    ``images`` puts components on other images by name, e.g. ``{"engine_build_op": <TensorRT image>}``.
    """
    images = dict(images or {})

    def comp(fn):
        # install_kfp_package=False: the image (or the local env) already has edgeslim and kfp.
        return dsl.component(fn, base_image=images.get(fn.__name__, base_image), install_kfp_package=False)

    engine_ops: dict = {}

    def engine_build_on(image: str):
        """``engine_build_op`` on ``image`` (one component per image: engine tasks run on their platform's)."""
        if image not in engine_ops:
            engine_ops[image] = dsl.component(engine_build_op, base_image=image, install_kfp_package=False)
        return engine_ops[image]

    return SimpleNamespace(engine_build_on=engine_build_on, **{f.__name__: comp(f) for f in (
        pull_op, export_op, transform_op, quantize_op, evaluate_op, gate_op, plan_engines_op,
        engine_build_op, register_op, reject_op, report_op)})
