"""``edgeslim engine ...``: bad input gets one line on stderr and a non-zero exit."""

from __future__ import annotations

import json

import pytest
from test_engine_fixtures import make_digits_onnx

from edgeslim import cli


@pytest.fixture(autouse=True)
def engine_commands(monkeypatch):
    # Until the lead lists the module in cli._COMMAND_MODULES.
    if "edgeslim.components.engine.cli" not in cli._COMMAND_MODULES:
        monkeypatch.setattr(cli, "_COMMAND_MODULES", (*cli._COMMAND_MODULES, "edgeslim.components.engine.cli"))


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    fp32, qdq, _ = make_digits_onnx(tmp_path_factory.mktemp("onnx"))
    return fp32, qdq


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeslim: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_classes_lists_the_registry(capsys):
    code, out, _ = run(capsys, "engine", "classes")
    assert code == 0 and "orin-sm87-jp6.1-trt10.3" in out and "xavier-sm72-jp5.1-trt8.5" in out


def test_plan_prints_the_profiles(capsys, onnx_pair):
    code, out, _ = run(capsys, "engine", "plan", str(onnx_pair[1]), "--device-class", "ada-sm89-trt10")
    assert code == 0
    plan = json.loads(out)
    assert plan["profiles"]["input"]["max"] == [64, 1, 8, 8] and plan["qdq_nodes"] > 0


def test_onnx_without_qdq_for_int8(capsys, onnx_pair):
    code, _, err = run(capsys, "engine", "plan", str(onnx_pair[0]), "--device-class", "ada-sm89-trt10")
    assert code == 2 and "no QuantizeLinear/DequantizeLinear nodes" in error_line(err)


def test_unknown_device_class(capsys, onnx_pair):
    code, _, err = run(capsys, "engine", "build", str(onnx_pair[1]), "--device-class", "nano", "--out", "x")
    assert code == 2 and "unknown device class 'nano'; known: ada-sm89-trt10" in error_line(err)


def test_profile_with_min_above_opt_above_max(capsys, onnx_pair, tmp_path):
    cfg = tmp_path / "engines.yaml"
    cfg.write_text("engines:\n  profiles:\n    - {input: input, min: [64, 1, 8, 8], opt: [8, 1, 8, 8], "
                   "max: [1, 1, 8, 8]}\n")
    code, _, err = run(capsys, "engine", "plan", str(onnx_pair[1]), "--device-class", "ada-sm89-trt10",
                       "--config", str(cfg))
    assert code == 2 and "min 64, opt 8, max 1; it needs min <= opt <= max" in error_line(err)


def test_build_without_a_gpu(capsys, onnx_pair, tmp_path, monkeypatch):
    from edgeslim.components.engine import builder as engine

    monkeypatch.setattr(engine, "detect_local_device", lambda: None)  # this machine, said outright
    code, _, err = run(capsys, "engine", "build", str(onnx_pair[1]), "--device-class", "ada-sm89-trt10",
                       "--out", str(tmp_path / "e"))
    assert code == 2 and "no CUDA device on this node" in error_line(err)


def test_check_an_engine_without_tensorrt_gives_the_install_hint(capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "model.engine").write_bytes(b"x")
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "edgeslim-trt-engine", "tensorrt": "10.3.0"}))
    code, _, err = run(capsys, "engine", "check", str(tmp_path))
    assert code == 2 and "pip install 'edgeslim[tensorrt10]'" in error_line(err)


def test_plan_refuses_what_some_tensorrt_of_the_class_cannot_build_in_one_line(capsys, onnx_pair, tmp_path):
    """Opset 18 on the TensorRT 8.5 class; same_compute_capability on a class whose 10.x range starts before 10.9."""
    code, _, err = run(capsys, "engine", "plan", str(onnx_pair[1]), "--device-class", "xavier-sm72-jp5.1-trt8.5")
    assert code != 0 and "qdq.onnx is opset 18, and TensorRT 8.5 (device class xavier-sm72-jp5.1-trt8.5) parses " \
        "opset 17 at most: export with export.opset: 17" in error_line(err)
    cfg = tmp_path / "engines.yaml"
    cfg.write_text("engines:\n  hardware_compatibility: same_compute_capability\n")
    code, _, err = run(capsys, "engine", "plan", str(onnx_pair[1]), "--device-class", "ada-sm89-trt10",
                       "--config", str(cfg))
    assert code != 0 and "same_compute_capability needs TensorRT 10.9 or newer; device class ada-sm89-trt10 admits " \
        "TensorRT 10.0-10.16, and a build node with 10.0-10.8 cannot build it" in error_line(err)
    cfg.write_text("engines:\n  hardware_compatibility: same_compute_capability\n  device_classes: [ada-sm89-trt10]\n"
                   "  min_tensorrt: {ada-sm89-trt10: '10.9'}\n")
    code, out, _ = run(capsys, "engine", "plan", str(onnx_pair[1]), "--device-class", "ada-sm89-trt10",
                       "--config", str(cfg))
    assert code == 0 and json.loads(out)["build_node_tensorrt"] == "10.9-10.16"
