"""``edgeslim bench``: every row, with its ratios, on both workloads (quick settings, not the targets)."""

import json

import pytest

from edgeslim.cli import main

pytestmark = pytest.mark.slow


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
    ours, full = rows["edgeslim PTQ (teacher)"], rows["full recipe: distill + prune + int8"]
    assert ours["int8"] and ours["size_ratio"] > 2.5  # scales and zero points cost more on tiny nets and ours["macs"] == teacher["macs"]
    assert full["macs"] < teacher["macs"] and full["size_ratio"] > ours["size_ratio"]
    assert "cpu_int8_kernel_top1" in full and "cpu_int8_kernel_top1" not in teacher
    text = capsys.readouterr().out
    assert "NOT the edge (TensorRT) speed-up" in text and "full recipe" in text


def test_bench_refuses_bad_repeats(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repeats" in err[0]


def test_the_fleet_benchmark_finds_the_rgw_script_it_starts():
    """`python -m edgeslim.pipelines.bench_fleet` starts a loopback RGW with the script CI uses."""
    from edgeslim.pipelines import bench_fleet

    assert bench_fleet.REPO_S3.is_file() and bench_fleet.REPO_S3.name == "rgw.sh"
