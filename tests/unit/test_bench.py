"""``edgeslim bench``: one harness; every row, with its ratios, on the classifier workloads (quick settings,
not the targets), and on a workload defined in the test."""

import json

import pytest

from edgeslim.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["digits", "mobile"])
def test_bench_rows_and_ratios(workload, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--workload", workload, "--quick", "--repeats", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == ["fp32 teacher", "ORT quantize_static defaults (teacher)", "edgeslim PTQ (teacher)",
                          "distill + prune student, fp32", "full recipe: distill + prune + int8"]
    teacher = rows["fp32 teacher"]
    assert teacher["size_ratio"] == 1.0 and teacher["top1_drop"] == 0.0
    for r in res["rows"]:
        assert r["latency_ms_b1"] > 0 and r["latency_ms_b32"] > 0 and r["size_bytes"] > 0
        assert r["size_ratio"] == round(teacher["size_bytes"] / r["size_bytes"], 2)
        assert 0 < r["stage_peak_rss_mb"] <= r["peak_rss_mb"] and r["stage_s"] >= 0
    ours, full = rows["edgeslim PTQ (teacher)"], rows["full recipe: distill + prune + int8"]
    assert ours["int8"] and ours["size_ratio"] > 2.5  # scales and zero points cost more on tiny nets and ours["macs"] == teacher["macs"]
    assert full["macs"] < teacher["macs"] and full["size_ratio"] > ours["size_ratio"]
    assert "cpu_int8_kernel_top1" in full and "cpu_int8_kernel_top1" not in teacher
    # each row's top-1 drop with its paired interval over the test images
    assert "top1_drop_low" not in teacher
    assert all(r["top1_drop_low"] <= r["top1_drop"] <= r["top1_drop_high"] for r in res["rows"][1:])
    text = capsys.readouterr().out
    assert "NOT the edge (TensorRT) speed-up" in text and "full recipe" in text and "d-lo95" in text


def test_bench_refuses_bad_repeats(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repeats" in err[0]


@pytest.mark.parametrize("sizes", ["2000,lots", "50", ""])
def test_the_data_bench_refuses_bad_sizes_in_one_line(sizes, capsys):
    assert main(["bench", "--workload", "data", "--sizes", sizes]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sizes" in err[0] and "2000,20000" in err[0]


def test_every_workload_the_command_offers_is_a_workload_with_columns_and_rows():
    """What `edgeslim bench --workload NAME` builds before it trains anything (the runs are the slow tier's)."""
    from edgeslim.pipelines.bench import WORKLOADS
    from edgeslim.pipelines.bench_harness import Workload

    assert set(WORKLOADS) >= {"digits", "mobile", "detect", "yolov8n", "yolov8n-trained", "resnet18",
                              "mobilenetv3", "vit-tiny"}
    for name, make in WORKLOADS.items():
        wl = make()
        assert isinstance(wl, Workload) and wl.columns, name
        assert type(wl).prepare is not Workload.prepare and type(wl).rows is not Workload.rows, name


def test_the_fleet_benchmark_finds_the_rgw_script_it_starts():
    """`python -m edgeslim.pipelines.bench_fleet` starts a loopback RGW with the script CI uses."""
    from edgeslim.pipelines import bench_fleet

    assert bench_fleet.REPO_S3.is_file() and bench_fleet.REPO_S3.name == "rgw.sh"


def test_one_harness_measures_any_workload_and_keeps_a_failed_row(tmp_path):
    """A workload defined here, outside the package: the harness adds size, MACs, latency, peak RSS,
    drops and ratios against the first row, and keeps a row that could not be built, with its reason."""
    import numpy as np
    import torch

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import OnnxExportConfig
    from edgeslim.components.export import export
    from edgeslim.pipelines.bench_harness import Column, RowSpec, Workload, format_rows, run_workload

    class Widths(Workload):
        name = "widths"
        columns = (Column("mean_abs", "mean |y|", 8, ".3f"),)
        drops = {"mean_abs_drop": ("mean_abs", 3)}

        def prepare(self, ctx):
            x = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
            y = np.zeros(64, np.int64)
            ctx.data = Splits(x, y, x, y, x, y)

        def rows(self, ctx):
            for width in (32, 8):
                torch.manual_seed(0)
                net = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))
                path = export(net.eval(), OnnxExportConfig(), data=ctx.data, out_path=ctx.workdir / f"w{width}.onnx")
                yield RowSpec(f"width {width}", path.model, macs=6 * width + width * 3)
            yield RowSpec("width 0", None, failed="a layer cannot be empty")

        def accuracy(self, ctx, spec, reference):
            from edgeslim.components.common.onnx_runtime import make_session, run_batched

            out = run_batched(make_session(spec.path), ctx.data.x_test)
            return {"mean_abs": float(np.abs(out).mean())}, out

    wl = Widths()
    res = run_workload(wl, workdir=tmp_path, repeats=3, log=lambda m: None)
    wide, narrow, failed = res["rows"]
    assert wide["size_ratio"] == 1.0 and wide["macs_ratio"] == 1.0 and wide["mean_abs_drop"] == 0.0
    assert narrow["macs_ratio"] == 4.0 and narrow["size_ratio"] > 1.0
    assert narrow["mean_abs_drop"] == round(wide["mean_abs"] - narrow["mean_abs"], 3)
    assert narrow["latency_b32_ratio"] == round(wide["latency_ms_b32"] / narrow["latency_ms_b32"], 2)
    assert failed["failed"] == "a layer cannot be empty" and failed["stage_s"] >= 0
    assert 0 < wide["peak_rss_mb"] <= narrow["peak_rss_mb"] <= res["peak_rss_mb"]
    # what building each row cost: its own wall time and peak RSS, never above the process's
    assert all(0 < r["stage_peak_rss_mb"] <= res["peak_rss_mb"] for r in (wide, narrow))
    table = format_rows(res, wl)
    assert "mean |y|" in table and "width 0" in table and "FAILED: a layer cannot be empty" in table


@pytest.mark.slow
def test_yolov8n_bench_reports_each_stages_cost_and_the_search_against_one_evaluation_pass(tmp_path, capsys):
    """Ultralytics' YOLOv8n at 640 with random weights (quick: 4 images a split, one calibrator): every row
    has its stage's wall time and peak RSS; the accuracy-aware row says what the search cost, as a multiple
    of one evaluation pass over val; the table says that the accuracy figures mean nothing here."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--workload", "yolov8n", "--quick", "--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows)[:2] == ["fp32", "edgeslim PTQ minmax"] and res["input"] == [3, 640, 640]
    auto = rows["edgeslim search (minmax, weighted)"]
    for r in res["rows"]:
        assert r["stage_s"] > 0 and r["stage_peak_rss_mb"] > 0
    assert rows["fp32"]["map50"] == 100.0  # scored against its own boxes
    # the ratio is of the unrounded times; the reported times are rounded (0.52 s is 0.515-0.525)
    assert auto["search_cost_ratio"] == pytest.approx(auto["search_s"] / auto["eval_pass_s"], rel=0.03)
    assert auto["trials"] >= 1
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "evaluation pass over val" in text and "b32 ms" in text


@pytest.mark.slow
def test_trained_yolov8n_bench_trains_then_reports_ptq_and_the_search_per_calibrator_on_test(tmp_path, capsys):
    """`--workload yolov8n-trained --quick`: a YOLOv8n (3 classes) trained a couple of steps on shape scenes
    with edgeslim's train_detector (its weights kept in the workdir), then plain PTQ and `quantize: auto` with
    that calibrator, scored on the test split against the drawn boxes, each drop with its interval; the
    search's row says which trial won or why none did."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--workload", "yolov8n-trained", "--quick", "--repeats", "1", "--json", str(out),
                 "--workdir", str(tmp_path / "wd")]) == 0
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    ultralytics_peer = "ModelOpt int8, Ultralytics' settings (own export, head excluded by name)"
    assert list(rows) == ["fp32", ultralytics_peer, "ModelOpt int8 (max, tails float)", "PTQ minmax, weighted",
                          "quantize: auto (minmax)"]
    # the hand-tuned peer (ModelOpt), on Ultralytics' export and on edgeslim's: a row of its own each, or
    # one line saying how to install it
    for peer in (rows[ultralytics_peer], rows["ModelOpt int8 (max, tails float)"]):
        assert "map50" in peer or "pip install 'nvidia-modelopt[onnx]'" in peer["failed"]
    assert res["input"][0] == 3 and res["epochs"] >= 1 and res["train_s"] > 0 and res["test_objects"] > 0
    assert len(list((tmp_path / "wd").glob("yolov8n-trained-seed0-*.pt"))) == 1  # what a rerun starts from
    for r in (rows["fp32"], rows["PTQ minmax, weighted"]):
        assert 0 <= r["map50_95"] <= r["map50"] <= 100
    low, high = rows["PTQ minmax, weighted"]["map50_95_drop_95"]
    assert low <= rows["PTQ minmax, weighted"]["map50_95_drop"] <= high
    auto = rows["quantize: auto (minmax)"]
    assert auto["search_s"] > 0 and auto["trials"] >= 1
    assert auto.get("failed") or (auto["winner"]["calibrator"] == "minmax" and "map50_drop" in auto
                                  and auto["winner"]["placement"] in ("all", "weighted"))
    text = capsys.readouterr().out
    assert "trained here" in text and "quantize: auto (minmax)" in text and "95% intervals" in text
