"""int8: calibrators, PTQ to a symmetric per-channel Q/DQ ONNX, sensitivity, QAT and the accuracy-aware search."""
