"""Quantizers the benchmarks compare edgeslim against, run on the same data."""

from __future__ import annotations

from pathlib import Path

from edgeslim.pipelines.bench_harness import RowSpec

MODELOPT_ROW = "ModelOpt int8 (max, tails float)"
ULTRALYTICS_ROW = "ModelOpt int8, Ultralytics' settings (own export, head excluded by name)"
# Ultralytics' TensorRT int8 export: ModelOpt excludes the head's six output convs and the DFL by node name,
# names that only Ultralytics' own ONNX export gives them (/model.22/cv2.0/cv2.0.2/Conv, /model.22/dfl/...).
ULTRALYTICS_EXCLUDE = (r".*\.2/Conv$", r".*/dfl/")
ULTRALYTICS_SAMPLES = 512  # the calibration images Ultralytics' int8 export reads


def ort_quantize_static_defaults(fp32: Path, data, out: Path) -> Path:
    """ONNX Runtime's quantize_static with its defaults, calibrated on the same train samples."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgeslim.components.export import INPUT_NAME

    calib = data.calibration(512, 0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: calib[i:i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader())
    return out


def modelopt_int8(fp32: Path, data, out: Path, samples: int = 512, exclude: list[str] | None = None) -> Path:
    """NVIDIA ModelOpt's ONNX int8 (``pip install 'nvidia-modelopt[onnx]'``): max calibration on CPU over
    the same train samples, with every output's tail (:func:`~edgeslim.components.quantize.sensitivity.output_tails`:
    the head's output convs, a DFL, the decode) kept in float, as Ultralytics' TensorRT int8 export uses it;
    or, with ``exclude``, the nodes those regular expressions match.

    ModelOpt runs in a process of its own: importing it patches ONNX Runtime's quantization modules for the
    whole process, which moved edgeslim's own PTQ rows built after it (a trained YOLOv8n's minmax PTQ read
    68.76 mAP@0.5:0.95 after ModelOpt had run in the same process, 68.08 without it).

    Raises:
        ModuleNotFoundError: nvidia-modelopt is not installed.
        RuntimeError: ModelOpt failed (its last output lines).
    """
    import importlib.util
    import json
    import re
    import subprocess
    import sys
    import tempfile

    import numpy as np

    from edgeslim.components.quantize.sensitivity import output_tails, preprocessed

    if importlib.util.find_spec("modelopt") is None:
        raise ModuleNotFoundError("No module named 'modelopt'", name="nvidia-modelopt")
    with tempfile.TemporaryDirectory(prefix="edgeslim-modelopt-") as tmp:
        if exclude is None:
            tails = output_tails(preprocessed(fp32, Path(tmp) / "pre.onnx"))
            exclude = [f"^{re.escape(n)}$" for t in tails for n in t["nodes"]]
        calib = Path(tmp) / "calib.npy"
        np.save(calib, data.calibration(samples, 0))
        # fp32 (not ModelOpt's default fp16) where it keeps float: the rows are compared in ONNX Runtime on CPU
        code = (
            "import sys, json, numpy as np\n"
            "from modelopt.onnx.quantization import quantize\n"
            "from edgeslim.components.export import INPUT_NAME\n"
            "fp32, calib, out, exclude = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])\n"
            "quantize(fp32, quantize_mode='int8', calibration_data={INPUT_NAME: np.load(calib)},\n"
            "         calibration_method='max', calibration_eps=['cpu'], nodes_to_exclude=exclude or None,\n"
            "         high_precision_dtype='fp32', output_path=out, log_level='WARNING')\n")
        proc = subprocess.run([sys.executable, "-c", code, str(fp32), str(calib), str(out), json.dumps(exclude)],
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not Path(out).is_file():
        raise RuntimeError(f"ModelOpt failed: {' '.join(proc.stderr.split()[-40:])}")
    return out


def modelopt_row(fp32: Path, data, out: Path, samples: int, macs: int) -> RowSpec:
    """The ModelOpt peer as a bench row (:func:`modelopt_int8`), or a failed row with the install line."""
    try:
        peer = modelopt_int8(fp32, data, out, samples=samples)
    except ModuleNotFoundError as exc:
        return RowSpec(MODELOPT_ROW, None, failed=f"{exc.name} is not installed: pip install 'nvidia-modelopt[onnx]'")
    except RuntimeError as exc:
        return RowSpec(MODELOPT_ROW, None, failed=str(exc))
    return RowSpec(MODELOPT_ROW, peer, macs, int8=True)


def ultralytics_onnx(model, imgsz: int, out: Path) -> Path:
    """An Ultralytics ``DetectionModel`` through Ultralytics' own ONNX exporter (BatchNorm fused, its node
    names), dynamic batch, its input renamed to edgeslim's so edgeslim's evaluator reads it. ``model`` is
    copied: the exporter fuses and flags the model it is given."""
    import copy
    import os
    import shutil
    import tempfile

    import onnx

    from edgeslim.components.export import INPUT_NAME

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.engine.exporter import Exporter

    m = copy.deepcopy(model).cpu().eval()
    m.task, m.args = "detect", dict(DEFAULT_CFG_DICT)
    with tempfile.TemporaryDirectory(prefix="edgeslim-ultralytics-") as tmp:
        m.pt_path = str(Path(tmp) / "model.pt")  # where the exporter writes its ONNX
        f = Exporter(overrides={"format": "onnx", "imgsz": imgsz, "dynamic": True, "simplify": False,
                                "half": False, "verbose": False})(model=m)
        g = onnx.load(str(f))
        old = g.graph.input[0].name
        g.graph.input[0].name = INPUT_NAME
        for n in g.graph.node:
            n.input[:] = [INPUT_NAME if i == old else i for i in n.input]
        onnx.save(g, str(out))
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def modelopt_ultralytics_row(model, imgsz: int, data, out_dir: Path, macs: int) -> RowSpec:
    """ModelOpt int8 with Ultralytics' TensorRT settings (:data:`ULTRALYTICS_EXCLUDE` by name, max calibration,
    :data:`ULTRALYTICS_SAMPLES` images) on Ultralytics' own ONNX export of ``model``, as a bench row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fp32 = ultralytics_onnx(model, imgsz, out_dir / "ultralytics.fp32.onnx")
        peer = modelopt_int8(fp32, data, out_dir / "ultralytics.modelopt.onnx", samples=ULTRALYTICS_SAMPLES,
                             exclude=list(ULTRALYTICS_EXCLUDE))
    except ModuleNotFoundError as exc:
        install = "'nvidia-modelopt[onnx]'" if exc.name == "nvidia-modelopt" else exc.name
        return RowSpec(ULTRALYTICS_ROW, None, failed=f"{exc.name} is not installed: pip install {install}")
    except RuntimeError as exc:
        return RowSpec(ULTRALYTICS_ROW, None, failed=str(exc))
    return RowSpec(ULTRALYTICS_ROW, peer, macs, int8=True)
