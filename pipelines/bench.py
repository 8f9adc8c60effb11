"""``edgeslim bench``: the baselines and the full recipe side by side, in one process, on the same data.

Rows:

1. the fp32 teacher as ONNX;
2. ONNX Runtime ``quantize_static`` with its defaults (what a user tries first);
3. edgeslim PTQ (symmetric, per-channel Q/DQ, percentile calibration);
4. the distilled + pruned student, fp32 ONNX;
5. the full recipe: that student, int8 (edgeslim PTQ).

Accuracy and fidelity are measured in Q/DQ semantics (what TensorRT's int8
math approximates, see DESIGN.md); latency is ONNX Runtime on this CPU with
its default optimizations. CPU int8 latency is printed as measured: on x86
without VNNI it is no guide to int8 speed on a Jetson.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeslim.pipelines.bench_peers import ort_quantize_static_defaults


TARGETS = {  # the full recipe on the digits workload (issue 3)
    "size_ratio": 10.0,          # int8 student at least 10x smaller than the fp32 teacher ONNX
    "macs_ratio": 4.0,           # at least 4x fewer MACs
    "latency_b32_ratio": 2.5,    # fp32 student at least 2.5x lower CPU latency at batch 32 than the fp32 teacher
    "max_top1_drop": 1.0,        # int8 student within 1.0 point of the teacher's top-1
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="compare fp32, ORT's default int8, edgeslim PTQ and the full recipe")
    p.add_argument("--workload", choices=("digits", "mobile", "detect"), default="digits",
                   help="digits: the VGG-style DigitsCNN teacher (default); mobile: the inverted-residual net; "
                   "detect: the YOLO-style detector (its own rows, see bench_detect)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows to this JSON file")
    p.add_argument("--workdir", default=None, help="keep the models here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads for latency (default 1: steadier on shared machines)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per latency (median reported)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--quick", action="store_true",
                   help="a few epochs everywhere: checks the command works, not the targets")
    p.set_defaults(func=cmd_bench)


def _recipe(quick: bool = False):
    """The compression recipe the bench runs: distil into a half-width student, then prune."""
    from edgeslim.components.common.stage_configs import ChannelPruneConfig, LogitDistillConfig, PTQQuantizeConfig

    stages = [
        # The reference models train with a one-pixel shift (the figures in the README use it).
        LogitDistillConfig(student="width", width=0.5, epochs=1 if quick else 30, lr=3e-3,
                           temperature=4.0, alpha=0.7, augment=["shift"]),
        ChannelPruneConfig(keep_fraction=0.6, importance="l2", finetune_epochs=1 if quick else 10,
                           distill=True, augment=["shift"]),
    ]
    return stages, PTQQuantizeConfig(calibrator="percentile", num_samples=512)


def _teacher(workload: str, data, seed: int, log, epochs: int = 25):
    import torch

    from edgeslim.components.reference.digits import DigitsCNN, train_classifier
    from edgeslim.components.reference.mobile import DigitsMobileNet

    torch.manual_seed(seed)
    model = DigitsCNN(width=64) if workload == "digits" else DigitsMobileNet(width=1.0)
    log(f"training the {type(model).__name__} teacher ({epochs} epochs)")
    return train_classifier(model, data.x_train, data.y_train, epochs=epochs, seed=seed)


def _row(name: str, path: Path, macs: int, data, ref_out, threads: int, repeats: int,
         int8: bool) -> dict[str, Any]:
    from edgeslim.components.evaluate import fidelity, latency_ms, run_batched, top1_percent
    from edgeslim.components.export import make_session

    out = run_batched(make_session(path, basic=True), data.x_test)
    fast = make_session(path, basic=False, threads=threads)
    row = {
        "row": name, "model": str(path), "int8": int8,
        "top1": round(top1_percent(out, data.y_test), 3),
        **({"top1_agreement": 1.0, "sqnr_db": None} if ref_out is None else fidelity(ref_out, out)),
        "size_bytes": path.stat().st_size, "macs": int(macs),
        "latency_ms_b1": latency_ms(fast, data.x_test, 1, 20, repeats),
        "latency_ms_b32": latency_ms(fast, data.x_test, 32, 10, repeats),
    }
    if int8:
        row["cpu_int8_kernel_top1"] = round(top1_percent(run_batched(fast, data.x_test), data.y_test), 3)
    return row, out


def run_bench(workload: str = "digits", *, workdir: str | Path, threads: int = 1, repeats: int = 50,
              seed: int = 0, quick: bool = False, log=print) -> dict[str, Any]:
    """Train the teacher, build every row, measure them; returns ``{rows, targets, ...}``."""
    import torch

    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.transform.stages import apply_torch_stages
    from edgeslim.components.export import export
    from edgeslim.components.transform.prune import count_macs_params
    from edgeslim.components.quantize.ptq import quantize

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from edgeslim.plugins.datasets import SklearnDigits

    data = SklearnDigits().load()
    t0 = time.perf_counter()
    teacher = _teacher(workload, data, seed, log, epochs=2 if quick else 25)
    one = torch.from_numpy(data.x_test[:1])
    t_macs = count_macs_params(teacher, one)[0]
    exp = OnnxExportConfig()
    t_onnx = export(teacher, exp, data=data, out_path=workdir / "teacher.fp32.onnx").model

    stages, ptq_cfg = _recipe(quick)
    log("compressing: " + " -> ".join(f"{s.stage}({s.method})" for s in stages) + " -> int8")
    student = apply_torch_stages(teacher, stages, data=data, teacher=teacher,
                                 progress=lambda s, i, n, l: None)
    s_macs = count_macs_params(student.model, one)[0]
    s_onnx = export(student.model, exp, data=data, out_path=workdir / "student.fp32.onnx").model

    log("quantizing (ORT defaults, edgeslim PTQ)")
    ort_q = ort_quantize_static_defaults(Path(t_onnx), data, workdir / "teacher.ort-default.int8.onnx")
    our_q = quantize(t_onnx, ptq_cfg, data=data, out_dir=workdir / "teacher-ptq").model
    stu_q = quantize(s_onnx, ptq_cfg, data=data, out_dir=workdir / "student-ptq").model

    log("measuring (accuracy in Q/DQ semantics; latency with ORT's CPU kernels)")
    rows = []
    ref_row, ref_out = _row("fp32 teacher", Path(t_onnx), t_macs, data, None, threads, repeats, False)
    rows.append(ref_row)
    for name, path, macs, int8 in (
        ("ORT quantize_static defaults (teacher)", Path(ort_q), t_macs, True),
        ("edgeslim PTQ (teacher)", Path(our_q), t_macs, True),
        ("distill + prune student, fp32", Path(s_onnx), s_macs, False),
        ("full recipe: distill + prune + int8", Path(stu_q), s_macs, True),
    ):
        rows.append(_row(name, path, macs, data, ref_out, threads, repeats, int8)[0])
    for r in rows:
        r["size_ratio"] = round(ref_row["size_bytes"] / r["size_bytes"], 2)
        r["macs_ratio"] = round(ref_row["macs"] / max(r["macs"], 1), 2)
        r["latency_b1_ratio"] = round(ref_row["latency_ms_b1"] / r["latency_ms_b1"], 2)
        r["latency_b32_ratio"] = round(ref_row["latency_ms_b32"] / r["latency_ms_b32"], 2)
        r["top1_drop"] = round(ref_row["top1"] - r["top1"], 3)
    full, fp32_student = rows[4], rows[3]
    checks = {
        "size_ratio": (full["size_ratio"], full["size_ratio"] >= TARGETS["size_ratio"]),
        "macs_ratio": (full["macs_ratio"], full["macs_ratio"] >= TARGETS["macs_ratio"]),
        "latency_b32_ratio (fp32 student vs fp32 teacher)": (
            fp32_student["latency_b32_ratio"], fp32_student["latency_b32_ratio"] >= TARGETS["latency_b32_ratio"]),
        "top1_drop (int8 student)": (full["top1_drop"], full["top1_drop"] <= TARGETS["max_top1_drop"]),
    }
    return {
        "workload": workload, "seconds": round(time.perf_counter() - t0, 1), "threads": threads,
        "repeats": repeats, "test_samples": int(len(data.x_test)), "rows": rows,
        "recipe": [s.to_json_dict() for s in stages] + [ptq_cfg.to_json_dict()],
        "stages": student.metrics["stages"],
        "targets": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()},
        "targets_apply": workload == "digits" and not quick, "quick": quick,
    }


def format_rows(result: dict[str, Any]) -> str:
    head = (f"{'row':<40} {'top-1 %':>7} {'agree':>6} {'SQNR dB':>7} {'size B':>9} {'MACs':>10} "
            f"{'b1 ms':>7} {'b32 ms':>7} | {'size x':>6} {'MACs x':>6} {'b1 x':>5} {'b32 x':>5}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        sq = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        lines.append(
            f"{r['row'][:40]:<40} {r['top1']:>7.2f} {r['top1_agreement']:>6.3f} {sq:>7} {r['size_bytes']:>9} "
            f"{r['macs']:>10} {r['latency_ms_b1']:>7.3f} {r['latency_ms_b32']:>7.3f} | {r['size_ratio']:>6.2f} "
            f"{r['macs_ratio']:>6.2f} {r['latency_b1_ratio']:>5.2f} {r['latency_b32_ratio']:>5.2f}")
    lines.append("")
    lines.append("Accuracy/fidelity: Q/DQ semantics (ORT_ENABLE_BASIC), fidelity against the fp32 teacher. "
                 "Latency: ORT CPU kernels, median; int8 CPU latency is as measured here and is NOT the "
                 "edge (TensorRT) speed-up.")
    for r in result["rows"]:
        if "cpu_int8_kernel_top1" in r:
            lines.append(f"  {r['row']}: top-1 with ORT's fused int8 CPU kernels {r['cpu_int8_kernel_top1']:.2f}%")
    if result["targets_apply"]:
        lines.append("Targets (digits, full recipe):")
        for k, t in result["targets"].items():
            lines.append(f"  {'met ' if t['met'] else 'MISS'} {k}: {t['value']}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from edgeslim.components.common.errors import ConfigError

    if args.repeats < 1 or args.threads < 0:
        raise ConfigError("bench: --repeats must be >= 1 and --threads >= 0 (0: ORT's default)")
    if args.workload == "detect":
        from edgeslim.pipelines.bench_detect import run_detect_bench

        return run_detect_bench(args)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="edgeslim-bench-") as tmp:
        result = run_bench(args.workload, workdir=args.workdir or tmp, threads=args.threads,
                           repeats=args.repeats, seed=args.seed, quick=args.quick, log=log)
        print(format_rows(result))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=1, default=str))
    return 0
