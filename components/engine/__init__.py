"""TensorRT engines: device classes, the builder and runner (numpy and tensorrt only: the device agent
uses them), and the engine stage of the pipeline (``stage``), which is not for the agent."""
