"""The device agent: installs, health-checks and rolls back models on an edge device.

It runs on a Jetson with numpy, cryptography and a runtime only, onnxruntime or JetPack's TensorRT (S3
through the standard-library client, ``deploy/s3client.py``, or boto3 when installed): nothing here imports
torch, mlflow, kfp, ``edgeslim.plugins`` or ``edgeslim.pipelines``, not even lazily (tests/unit/test_layers.py).
"""
