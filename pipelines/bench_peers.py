"""Quantizers the benchmarks compare edgeslim against, run on the same data."""

from __future__ import annotations

from pathlib import Path


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
