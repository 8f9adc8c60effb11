"""Data at scale: wall time and peak memory of calibration and evaluation on an image folder, by size.

:func:`data_scale_bench` writes N synthetic 64x64 JPEGs per size into a temporary image folder,
then, in a fresh Python process per size (so that one size's peak does not carry into the
next), loads it with the ``imagefolder`` provider (lazy splits), calibrates a small CNN's ONNX
(512 samples, the PTQ calibrator's one pass), runs one plain ONNX Runtime pass over the same
512 images, and one evaluation pass over the validation split. It reports each step's wall time
and the process's peak RSS (``VmHWM``) side by side, with the ratio of the largest size's peak
to the smallest's. Then, again in a fresh process per count, it calibrates 256 and 1024 samples
of the smallest folder with each of :data:`CALIBRATORS` (medians of :data:`REPEATS` runs, each
beside a plain ONNX Runtime pass over the same images) and reports how wall time and the peak
RSS of calibration grow with the samples. The model's weights are random: this measures cost,
not accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

IMAGE_SIZE = 64
CLASSES = 10
CALIBRATION_SAMPLES = 512
GROWTH_SAMPLES = (256, 1024)  # calibration samples whose cost is compared
CALIBRATORS = ("entropy", "minmax")  # the other histogram calibrators bin as entropy does
REPEATS = 3
PREPROCESS = {"resize": [IMAGE_SIZE, IMAGE_SIZE], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def write_jpegs(root: str | Path, n: int, seed: int = 0) -> float:
    """``n`` synthetic ``IMAGE_SIZE``-pixel JPEGs in ``CLASSES`` class folders under ``root``; seconds taken."""
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    for c in range(CLASSES):
        Path(root, f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % CLASSES
        base = np.stack([np.sin(6.28 * (xx * (c + 1) / 3 + k / 3)) for k in range(3)], -1) * 80 + 128
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(Path(root, f"class{c}", f"{i:06d}.jpg"), quality=90)
    return time.perf_counter() - t0


def write_model(path: str | Path) -> Path:
    """A small CNN for 3x64x64 inputs (random weights), exported to ONNX."""
    import numpy as np
    import torch
    from torch import nn

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES)).eval()
    x = np.random.default_rng(0).standard_normal((4, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    y = np.zeros(4, np.int64)
    return Path(export(model, OnnxExportConfig(), data=Splits(x, y, x, y, x, y), out_path=path).model)


def _status_mb(field: str) -> float | None:
    """A kB field of /proc/self/status (``VmHWM``, ``VmRSS``) in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``; ``ru_maxrss`` where there is no /proc), in MB."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """This process's resident set size now (``VmRSS``), in MB; 0 where there is no /proc."""
    return _status_mb("VmRSS") or 0.0


def reset_peak_rss() -> bool:
    """Start this process's peak RSS afresh (Linux ``clear_refs``); False where it cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_calibration(root: str, onnx_path: str, samples: int, calibrators: Sequence[str] = CALIBRATORS,
                        repeats: int = REPEATS) -> dict[str, Any]:
    """Calibrating ``samples`` images of ``root`` by each calibrator, in this process: the median wall
    time of ``repeats`` runs, the median of a plain ONNX Runtime pass over the same images run beside
    each, their ratio, and the peak RSS of each (the peak is reset before each step where the OS allows
    it, ``peak_rss_reset``; otherwise it is the process's peak so far)."""
    import statistics

    from edgeslim.components.common.data import load_data
    from edgeslim.components.common.onnx_runtime import make_session, run_batched
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import calibrate_onnx

    data = load_data("imagefolder", {"root": root, "val_fraction": 0.1, "test_fraction": 0.1}, PREPROCESS)
    sess = make_session(onnx_path)
    row: dict[str, Any] = {"samples": min(samples, len(data.x_train)), "rss_before_mb": round(rss_mb(), 1)}
    times: dict[str, list[float]] = {k: [] for k in (*calibrators, "plain_pass")}
    peaks = dict.fromkeys(times, 0.0)

    def timed(key: str, step) -> None:
        row["peak_rss_reset"] = reset_peak_rss()
        t = time.perf_counter()
        step()
        times[key].append(time.perf_counter() - t)
        peaks[key] = max(peaks[key], peak_rss_mb())

    for _ in range(repeats):  # calibrators and plain passes take turns: the machine's load falls on all
        for cal in calibrators:
            cfg = PTQQuantizeConfig(calibrator=cal, num_samples=samples)
            timed(cal, lambda cfg=cfg: calibrate_onnx(onnx_path, cfg, data))
            timed("plain_pass", lambda: run_batched(sess, data.calibration(samples, 0)))
    for key, seconds in times.items():
        row[f"{key}_s"] = round(statistics.median(seconds), 3)
        row[f"{key}_peak_rss_mb"] = round(peaks[key], 1)
    for cal in calibrators:
        row[f"{cal}_x_plain"] = round(row[f"{cal}_s"] / max(row["plain_pass_s"], 1e-9), 2)
    return row


def _in_fresh_process(code: str, *args: str) -> dict[str, Any]:
    """``code`` (which prints one JSON line last) in a new interpreter; its parsed output."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_data: the measuring process ({' '.join(args)}) failed: {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(root: str, onnx_path: str) -> dict[str, Any]:
    """One size, in this process: load, calibrate, a plain pass over the calibration images, evaluate val."""
    import numpy as np

    from edgeslim.components.common.data import load_data
    from edgeslim.components.common.onnx_runtime import make_session, run_batched
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import calibrate_onnx
    from edgeslim.components.common.accuracy import top1_percent

    row: dict[str, Any] = {"rss_after_imports_mb": round(peak_rss_mb(), 1)}
    t = time.perf_counter()
    data = load_data("imagefolder", {"root": root, "val_fraction": 0.1, "test_fraction": 0.1}, PREPROCESS)
    row["load_s"] = round(time.perf_counter() - t, 2)
    row.update(images=len(data.x_train) + len(data.x_val) + len(data.x_test), val_images=len(data.x_val),
               held_in_memory_mb=round((len(data.x_train) + len(data.x_val) + len(data.x_test))
                                       * int(np.prod(data.input_shape)) * 4 / 2**20, 1))
    t = time.perf_counter()
    ranges = calibrate_onnx(onnx_path, PTQQuantizeConfig(calibrator="entropy", num_samples=CALIBRATION_SAMPLES),
                            data)
    row["calibration_s"] = round(time.perf_counter() - t, 2)
    row["calibrated_tensors"] = len(ranges)
    sess = make_session(onnx_path)
    t = time.perf_counter()
    run_batched(sess, data.calibration(CALIBRATION_SAMPLES, 0))
    row["plain_pass_512_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    out = run_batched(sess, data.x_val)
    row["eval_val_s"] = round(time.perf_counter() - t, 2)
    row["val_top1_random_weights"] = round(top1_percent(out, data.y_val), 2)
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return row


def data_scale_bench(sizes: Sequence[int] = (2000, 20000), workdir: str | Path | None = None,
                     progress=None, calibration_samples: Sequence[int] = GROWTH_SAMPLES,
                     repeats: int = REPEATS) -> dict[str, Any]:
    """Calibration (512 samples) and one validation pass over image folders of ``sizes`` images, then
    calibration of ``calibration_samples`` samples of the first folder by each of :data:`CALIBRATORS`.

    Args:
        sizes: images per folder (10% go to validation, 10% to test).
        workdir: where the folders and the model go (a temporary folder, removed after, when None).
        progress: called with a line per step.
        calibration_samples: calibration sizes compared (each in a fresh process).
        repeats: calibrations (and plain passes) per calibrator and size; medians are reported.

    Returns:
        ``{"rows": [one per size], "peak_rss_ratio": largest / smallest, "target": ...,
        "calibration": [one per calibration size], "calibration_growth": last / first per column}``.
    """
    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="edgeslim-bench-data-") as tmp:
        base = Path(workdir) if workdir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        onnx_path = write_model(base / "model.onnx")
        rows = []
        for n in sizes:
            root = base / f"images-{n}"
            write_s = write_jpegs(root, n)
            say(f"{n} JPEGs written in {write_s:.1f}s")
            # A fresh interpreter per size: peak RSS is per process and never goes down.
            code = ("import json, sys; from edgeslim.pipelines.bench_data import measure; "
                    "print(json.dumps(measure(sys.argv[1], sys.argv[2])))")
            t = time.perf_counter()
            row = {"size": n, "write_s": round(write_s, 1), **_in_fresh_process(code, str(root), str(onnx_path)),
                   "process_s": round(time.perf_counter() - t, 1)}
            say(json.dumps(row))
            rows.append(row)
        calib = []
        code = ("import json, sys; from edgeslim.pipelines.bench_data import measure_calibration; "
                "print(json.dumps(measure_calibration(sys.argv[1], sys.argv[2], int(sys.argv[3]), "
                "repeats=int(sys.argv[4]))))")
        for k in calibration_samples:
            calib.append(_in_fresh_process(code, str(base / f"images-{sizes[0]}"), str(onnx_path), str(k),
                                           str(repeats)))
            say(json.dumps(calib[-1]))
    first, last = rows[0], rows[-1]
    growth = {k: round(calib[-1][k] / calib[0][k], 2) for k in calib[0]
              if k.endswith(("_s", "_mb")) and k != "rss_before_mb" and calib[0][k]} if calib else {}
    return {"rows": rows, "peak_rss_ratio": round(last["peak_rss_mb"] / first["peak_rss_mb"], 3),
            "target": "peak RSS within 10% from the smallest to the largest folder",
            "met": last["peak_rss_mb"] <= 1.10 * first["peak_rss_mb"],
            "calibration": calib, "calibration_growth": growth,
            "calibration_target": "calibration at most 3x one plain ONNX Runtime pass over the same images"}


def format_bench(result: dict[str, Any]) -> str:
    """The rows side by side as a text table."""
    keys = ["size", "val_images", "held_in_memory_mb", "load_s", "calibration_s", "plain_pass_512_s", "eval_val_s",
            "rss_after_imports_mb", "peak_rss_mb"]
    lines = [" ".join(f"{k:>20}" for k in keys)]
    lines += [" ".join(f"{r[k]!s:>20}" for k in keys) for r in result["rows"]]
    lines.append(f"peak RSS ratio {result['peak_rss_ratio']} ({'met' if result['met'] else 'missed'}: "
                 f"{result['target']})")
    calib = result.get("calibration") or []
    if calib:
        keys = [k for k in calib[0] if k not in ("peak_rss_reset",)]
        lines.append(" ".join(f"{k:>20}" for k in keys))
        lines += [" ".join(f"{r[k]!s:>20}" for k in keys) for r in calib]
        growth = result["calibration_growth"]
        lines.append(" ".join(f"{'x' + str(growth[k]) if k in growth else '':>20}" for k in keys)
                     + f"  (last / first; {result['calibration_target']})")
    return "\n".join(lines)

