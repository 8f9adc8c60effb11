"""The recipe ``edgeslim init`` writes for a classifier: every stage and gate key, commented."""

INIT_TEMPLATE = """\
# edgeslim recipe for {source}
# Written by `edgeslim init`; run it with `edgeslim run {output}`.
# Every key is documented in the recipe reference (docs/recipe-reference.md).
version: 1

# The registered PyTorch model to compress (logged with mlflow.pytorch.log_model,
# serialization_format="pickle" if you will distil or prune it).
source: {source}

# Calibration draws from train only; the gate judges on test.
data:
{data}

# Stages in order; distill/prune (if any) first, the one quantize stage last.
stages:
  - export: {{}}                     # ONNX, dynamic batch, checked against torch; opset: the highest
                                     # every class in engines.device_classes parses (18 at most)
  - quantize:
      method: ptq                    # symmetric int8, per-channel weights: what TensorRT wants
      calibrator: percentile         # minmax | entropy | percentile | mse
      percentile: 99.99
      num_samples: 512
      num_bins: 2048
      float_layers: []               # ONNX node names or patterns kept in float

# A candidate that misses any check is not registered; `edgeslim run` exits 3.
gate:
  max_metric_drop: 1.0               # points of top-1
  min_top1_agreement: 0.97           # share of test samples whose top-1 matches the parent
  min_sqnr_db: 15.0                  # output SQNR against the parent
{confidence}

evaluate:
  latency_batches: [1, 32]
  latency_warmup: 5
  latency_repeats: 30

register:
  name: "{edge_name}"
  alias: edge-candidate
  experiment: edgeslim
"""
