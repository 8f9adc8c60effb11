"""Data at scale, end to end: each task of a whole ``edgeslim run``, its peak RSS and wall time, by dataset size.

:func:`pipeline_scale_bench` writes an image dataset per size, registers a model in a real ``mlflow
server`` on loopback, and runs ``edgeslim run`` (Kubeflow's local runner: every task is a process of its
own) while it watches the process tree: per task, the peak RSS of its processes and its wall time; then
the largest size's figures over the smallest's. Two workloads: an image-folder classifier of the user's
own and a YOLO-format detector (:data:`PIPELINE_WORKLOADS`). :mod:`.bench_data` measures calibration
alone, in one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from edgeslim.pipelines.bench_data import CALIBRATION_SAMPLES, CLASSES

# The user's own classifier, as a user writes it: a module logged with the model (``code_paths``).
CLASSIFIER_MODULE = "edgeslim_bench_net"
CLASSIFIER_CODE = '''\
"""A small CNN for 3x224x224 images, 10 classes."""
from torch import nn


class BenchNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x))
'''
SMALL_PNG = 48  # the classifier's files: small PNGs that the recipe's preprocessing resizes to 256, crops to 224
DETECT_CANVAS = 128  # the detector's images (grey PNGs with rectangles), letterboxed to the same size
DETECT_CLASSES = 3
# Random weights (the classifier) or seconds of training (the detector): the gate is opened wide, so that
# every task of the pipeline runs, register included; the bench measures cost, not accuracy.
OPEN_GATE = {"max_metric_drop": 100.0, "min_top1_agreement": 0.0, "min_sqnr_db": 0.0}
OPEN_DETECTION_GATE = {"max_map_drop": 100.0, "max_map50_95_drop": 100.0, "max_tp_score_drop": 1.0,
                       "max_recall_drop": 100.0, "min_recall": 0.0}


def write_png_classes(root: str | Path, n: int, variants: int = 16) -> float:
    """``n`` small PNGs in ``CLASSES`` class folders under ``root`` (one folder, split 80/10/10 by the
    provider); seconds taken. Each class has ``variants`` encoded images whose bytes are written again
    under new names: writing 20,000 files costs what copying them does."""
    import io

    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SMALL_PNG, 0:SMALL_PNG] / SMALL_PNG
    blobs = []
    for c in range(CLASSES):
        Path(root, f"class{c}").mkdir(parents=True, exist_ok=True)
        for v in range(variants):
            base = np.stack([np.sin(6.28 * (xx * (c + 1) / 3 + yy * v / 7 + k / 3)) for k in range(3)], -1) * 80 + 128
            img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            blobs.append(buf.getvalue())
    for i in range(n):
        c = i % CLASSES
        Path(root, f"class{c}", f"{i:06d}.png").write_bytes(blobs[c * variants + (i // CLASSES) % variants])
    return time.perf_counter() - t0


def write_yolo_boxes(root: str | Path, n: int, variants: int = 32) -> float:
    """``n`` grey ``DETECT_CANVAS``-pixel PNGs with one to three filled rectangles as an Ultralytics dataset
    (``data.yaml``, ``images/<split>``, ``labels/<split>``, 80/10/10); seconds taken. As above, ``variants``
    encoded scenes are written again under new names."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    s = DETECT_CANVAS
    scenes = []
    for _ in range(variants):
        im = Image.new("L", (s, s), 40)
        draw, lines = ImageDraw.Draw(im), []
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(0, DETECT_CLASSES))
            w, h = (int(v) for v in rng.integers(s // 8, s // 3, 2))
            x, y = int(rng.integers(0, s - w)), int(rng.integers(0, s - h))
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=90 + 70 * c)
            lines.append(f"{c} {(x + w / 2) / s:.6f} {(y + h / 2) / s:.6f} {w / s:.6f} {h / s:.6f}")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        scenes.append((buf.getvalue(), "\n".join(lines) + "\n"))
    cut = {"train": range(0, int(n * 0.8)), "val": range(int(n * 0.8), int(n * 0.9)), "test": range(int(n * 0.9), n)}
    for split, rows in cut.items():
        Path(root, "images", split).mkdir(parents=True, exist_ok=True)
        Path(root, "labels", split).mkdir(parents=True, exist_ok=True)
        for i in rows:
            blob, label = scenes[i % variants]
            Path(root, "images", split, f"{i:06d}.png").write_bytes(blob)
            Path(root, "labels", split, f"{i:06d}.txt").write_text(label)
    names = "\n".join(f"  {c}: shape{c}" for c in range(DETECT_CLASSES))
    Path(root, "data.yaml").write_text(f"train: images/train\nval: images/val\ntest: images/test\nnames:\n{names}\n")
    return time.perf_counter() - t0


def register_classifier(uri: str, workdir: Path) -> str:
    """The user's CNN (random weights), logged with its module as ``code_paths`` and registered."""
    import importlib

    import mlflow
    import torch

    from edgeslim.components.common.tracking import connect

    code = workdir / f"{CLASSIFIER_MODULE}.py"
    code.write_text(CLASSIFIER_CODE)
    sys.path.insert(0, str(workdir))
    try:
        torch.manual_seed(0)
        model = importlib.import_module(CLASSIFIER_MODULE).BenchNet().eval()
        client = connect(uri)
        mlflow.set_experiment("bench-data")
        with mlflow.start_run(run_name="bench classifier"):
            info = mlflow.pytorch.log_model(model, name="model", code_paths=[str(code)],
                                            serialization_format="pickle", registered_model_name="bench-net")
    finally:
        sys.path.remove(str(workdir))
        sys.modules.pop(CLASSIFIER_MODULE, None)
    client.set_registered_model_alias("bench-net", "champion", info.registered_model_version)
    return "models:/bench-net@champion"


def register_detector(uri: str, data_yaml: Path) -> str:
    """The reference YOLO-style detector, trained one epoch on 256 training images, registered."""
    import mlflow
    import torch

    from edgeslim.components.common.data import load_data
    from edgeslim.components.common.tracking import connect
    from edgeslim.components.reference.detector import DigitsDetector, train_detector

    data = load_data("yolo", {"path": str(data_yaml)}, DETECT_PREPROCESS)
    torch.manual_seed(0)
    model = train_detector(DigitsDetector(width=8, head_hidden=8, num_classes=DETECT_CLASSES),
                           data.x_train[:256], data.y_train[:256], epochs=1, batch_size=32)
    client = connect(uri)
    mlflow.set_experiment("bench-data")
    with mlflow.start_run(run_name="bench detector"):
        info = mlflow.pytorch.log_model(model.eval(), name="model", serialization_format="pickle",
                                        registered_model_name="bench-detector")
    client.set_registered_model_alias("bench-detector", "champion", info.registered_model_version)
    return "models:/bench-detector@champion"


DETECT_PREPROCESS = {"letterbox": DETECT_CANVAS, "scale": 255.0, "channel_order": "GRAY"}


def classifier_recipe(path: Path, source: str, root: Path, uri: str) -> Path:
    """What ``edgeslim init --data imagefolder --data-arg root=ROOT`` writes, cut to export + PTQ (entropy,
    512 samples), with the gate opened (random weights)."""
    import yaml

    proc = subprocess.run([sys.executable, "-m", "edgeslim", "init", "--source", source, "--data", "imagefolder",
                           "--data-arg", f"root={root}", "-o", str(path), "--force", "--tracking-uri", uri],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_data: edgeslim init failed: {proc.stderr[-800:]}")
    doc = yaml.safe_load(path.read_text())
    doc["stages"] = [{"export": {"opset": 18}},
                     {"quantize": {"method": "ptq", "calibrator": "entropy", "num_samples": CALIBRATION_SAMPLES}}]
    doc["gate"] = dict(OPEN_GATE)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def detector_recipe(path: Path, source: str, data_yaml: Path) -> Path:
    """A YOLO-format detector's recipe: export + PTQ (entropy, 512 samples), the detection gate opened."""
    import yaml

    from edgeslim.components.reference.detector import default_heads

    doc = {"version": 1, "source": source,
           "data": {"provider": "yolo", "args": {"path": str(data_yaml)}, "preprocess": DETECT_PREPROCESS},
           "task": {"kind": "detection", "num_classes": DETECT_CLASSES, "score_threshold": 0.25,
                    "decoder": {"heads": default_heads()}, "gate": dict(OPEN_DETECTION_GATE)},
           "stages": [{"export": {"opset": 18}},
                      {"quantize": {"method": "ptq", "calibrator": "entropy", "num_samples": CALIBRATION_SAMPLES}}],
           "evaluate": {"latency_batches": [1, 32], "latency_warmup": 2, "latency_repeats": 5},
           "register": {"name": "bench-detector-edge", "alias": "edge-candidate", "experiment": "bench-data"}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process under it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _task_of(pid: int) -> str | None:
    """The Kubeflow component a process runs (``--function_to_execute NAME``), ``run`` for the rest."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for a, b in zip(argv, argv[1:]):
        if a == b"--function_to_execute":
            return b.decode().removesuffix("_op")
    return "run"


def _hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure_run(recipe: Path, uri: str, out: Path, period: float = 0.05, python: str = "") -> dict[str, Any]:
    """``edgeslim run RECIPE`` in a subprocess, its process tree watched every ``period`` seconds: per
    task (each Kubeflow component runs in its own process; ``run`` is the command's own process:
    preflight and the runner), its peak RSS (``VmHWM``, the largest of the task's processes) and wall time
    (first to last sight of its processes), and the pipeline's total. ``python``: the interpreter whose
    edgeslim runs (default this one; another checkout's environment, to compare two versions)."""
    proc = subprocess.Popen([python or sys.executable, "-m", "edgeslim", "run", str(recipe), "--tracking-uri", uri,
                             "--workdir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tasks: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    import threading

    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        now = time.perf_counter() - t0
        for pid in _descendants(proc.pid):
            name, hwm = _task_of(pid), _hwm_mb(pid)
            if name is None or hwm is None:
                continue
            row = tasks.setdefault(name, {"peak_rss_mb": 0.0, "start": now, "end": now})
            row["peak_rss_mb"], row["end"] = max(row["peak_rss_mb"], hwm), now
        time.sleep(period)
    stdout = proc.stdout.read()
    reader.join(timeout=10)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench_data: edgeslim run failed (exit {proc.returncode}): "
                           f"{(''.join(chunks) or stdout)[-1500:]}")
    return {"total_s": round(total, 1),
            "tasks": {k: {"peak_rss_mb": round(v["peak_rss_mb"], 1), "wall_s": round(v["end"] - v["start"], 1)}
                      for k, v in tasks.items()}}


def _own_edge_name(recipe: Path, label: str) -> Path:
    """The recipe registering under a name of ``label``'s own: a version made by another edgeslim from the
    same parent and recipe would otherwise be found and reused, and registration not measured."""
    import yaml

    if not label:
        return recipe
    doc = yaml.safe_load(recipe.read_text())
    doc["register"]["name"] = f"{doc['register'].get('name') or 'bench'}-{label}"
    out = recipe.with_name(f"{recipe.stem}-{label}.yaml")
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


PIPELINE_WORKLOADS = ("classifier", "detector")


def pipeline_scale_bench(sizes: Sequence[int] = (2000, 20000), workloads: Sequence[str] = PIPELINE_WORKLOADS,
                         workdir: str | Path | None = None, progress=None,
                         pythons: dict[str, str] | None = None) -> dict[str, Any]:
    """A whole ``edgeslim run`` per workload and dataset size, each task's peak RSS and wall time, and the
    ratio of the largest size's figures to the smallest's.

    ``classifier``: a small CNN of the user's own (224x224, 10 classes, registered with ``code_paths``,
    random weights) on an image folder of small PNGs, with the recipe ``edgeslim init --data imagefolder``
    writes cut to export + PTQ (entropy, 512 samples). ``detector``: the reference YOLO-style detector on
    an Ultralytics dataset of ``DETECT_CANVAS``-pixel PNGs, export + PTQ (entropy, 512 samples). The gates
    are opened so that every task runs, registration included. A real ``mlflow server`` on loopback.

    ``pythons``: ``{label: interpreter}`` to run each size with several edgeslim installs in turn (e.g.
    ``{"old": ..., "new": ...}``, on the same files and models); default this interpreter, labelled ``""``.

    Returns:
        ``{"workloads": {name: {"rows": [{size, version, write_s, total_s, tasks}], "ratio": {version:
        {task: {peak_rss, wall}}}, "met": {version: bool}}}, "target": ...}``.
    """
    from edgeslim.components.common.mlflow_server import MlflowServer

    unknown = sorted(set(workloads) - set(PIPELINE_WORKLOADS))
    if unknown:
        raise ValueError(f"bench_data: unknown workload {unknown[0]!r}; use {', '.join(PIPELINE_WORKLOADS)}")
    say = progress or (lambda msg: None)
    result: dict[str, Any] = {"workloads": {}, "target": "every task's peak RSS within 10% from the smallest "
                                                         "to the largest dataset"}
    with tempfile.TemporaryDirectory(prefix="edgeslim-bench-pipeline-") as tmp:
        base = Path(workdir) if workdir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        with MlflowServer(base / "mlflow") as server:
            for wl in workloads:
                rows = []
                source = None
                for n in sizes:
                    root = base / f"{wl}-{n}"
                    if wl == "classifier":
                        write_s = write_png_classes(root, n)
                        source = source or register_classifier(server.uri, base)
                        recipe = classifier_recipe(base / f"{wl}-{n}.yaml", source, root, server.uri)
                    else:
                        write_s = write_yolo_boxes(root, n)
                        source = source or register_detector(server.uri, root / "data.yaml")
                        recipe = detector_recipe(base / f"{wl}-{n}.yaml", source, root / "data.yaml")
                    for label, python in (pythons or {"": ""}).items():
                        say(f"{wl}: {n} images written in {write_s:.1f}s; running the pipeline {label}".rstrip())
                        row = {"size": n, "version": label, "write_s": round(write_s, 1),
                               **measure_run(_own_edge_name(recipe, label), server.uri, base / f"{wl}-{n}-run{label}",
                                             python=python)}
                        say(json.dumps(row))
                        rows.append(row)
                ratio, met = {}, {}
                for label in (pythons or {"": ""}):
                    mine = [r for r in rows if r["version"] == label]
                    first, last = mine[0]["tasks"], mine[-1]["tasks"]
                    ratio[label] = {k: {"peak_rss": round(last[k]["peak_rss_mb"] / first[k]["peak_rss_mb"], 3),
                                        "wall": round(last[k]["wall_s"] / max(first[k]["wall_s"], 1e-9), 2)}
                                    for k in first if k in last}
                    met[label] = all(r["peak_rss"] <= 1.10 for r in ratio[label].values())
                result["workloads"][wl] = {"rows": rows, "ratio": ratio, "met": met}
    return result


def format_pipeline_bench(result: dict[str, Any]) -> str:
    """Per workload and version, per task: peak RSS and wall time at each size, and the largest size over
    the smallest."""
    lines = []
    for wl, res in result["workloads"].items():
        for label, ratio in res["ratio"].items():
            rows = [r for r in res["rows"] if r["version"] == label]
            head = ["task"] + [f"{k} @{r['size']}" for r in rows for k in ("rss_mb", "wall_s")] + ["rss x", "wall x"]
            lines.append(f"{wl} {label}".rstrip() + ": " + ("met" if res["met"][label] else "missed")
                         + f" ({result['target']})")
            lines.append(" ".join(f"{h:>16}" for h in head))
            for task in rows[0]["tasks"]:
                cells = [task]
                for r in rows:
                    t = r["tasks"].get(task, {})
                    cells += [t.get("peak_rss_mb", "-"), t.get("wall_s", "-")]
                cells += [ratio.get(task, {}).get("peak_rss", "-"), ratio.get(task, {}).get("wall", "-")]
                lines.append(" ".join(f"{c!s:>16}" for c in cells))
            lines.append(" ".join(f"{c!s:>16}" for c in ["pipeline"] + [v for r in rows for v in ("", r["total_s"])]))
    return "\n".join(lines)
