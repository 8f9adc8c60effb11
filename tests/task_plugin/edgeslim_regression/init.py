"""The recipe ``edgeslim init --task regression`` writes."""

INIT_TEMPLATE = """\
# edgeslim recipe for the regressor {source}
# Written by `edgeslim init --task regression` (the edgeslim-regression plugin); run it with `edgeslim run {output}`.
version: 1

source: {source}

# Regression labels: y_* float arrays of shape (N,), the value each input should predict.
data:
{data}

stages:
  - export: {{opset: 18}}
  - quantize:
      method: ptq                    # or auto: PTQ per calibrator, judged by task.gate on val
      calibrator: percentile
      num_samples: 512

task:
  kind: regression
  tolerance: 0.5                     # a prediction within this of its label counts as right (the metric)
  gate:
    max_mae_increase: 0.05           # mean absolute error may rise this much
    min_sqnr_db: 20.0                # output SQNR against the fp32 model

evaluate:
  latency_batches: [1, 32]
  latency_warmup: 5
  latency_repeats: 30

register:
  name: "{edge_name}"
  alias: edge-candidate
  experiment: edgeslim
"""
