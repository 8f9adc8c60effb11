"""The device agent: installs, health-checks and rolls back models on an edge device.

It runs on a Jetson with numpy, onnxruntime, boto3 and cryptography only: nothing here imports
torch, mlflow, kfp, ``edgeslim.plugins`` or ``edgeslim.pipelines`` (tests/unit/test_layout.py).
"""
