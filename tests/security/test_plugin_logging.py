"""Finding 9: the ``mlflow deployments`` plugin logged the AWS access key id and the request
signature at DEBUG (botocore logs request headers at DEBUG).

A real process with ``logging.basicConfig(level=DEBUG)`` uses the ``edge`` target against RGW;
its whole log must contain neither the access key id nor ``Signature=``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from mlflow.deployments import get_deploy_client
client = get_deploy_client("edge:/lab")
print("DEPLOYMENTS", client.list_deployments())
logging.getLogger("probe").debug("probe: the log is at DEBUG")
"""


def test_plugin_at_debug_never_logs_the_access_key_or_signature(rgw, s3_url, tmp_path):
    env = dict(os.environ, EDGESLIM_FLEET_STORE=s3_url, EDGESLIM_S3_ENDPOINT_URL=rgw["S3_ENDPOINT_URL"],
               AWS_ACCESS_KEY_ID=rgw["AWS_ACCESS_KEY_ID"], AWS_SECRET_ACCESS_KEY=rgw["AWS_SECRET_ACCESS_KEY"])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEPLOYMENTS []" in proc.stdout  # it did talk to the store
    assert "probe: the log is at DEBUG" in proc.stderr  # the log really was at DEBUG
    log = proc.stdout + proc.stderr
    assert rgw["AWS_ACCESS_KEY_ID"] not in log
    assert "Signature=" not in log and rgw["AWS_SECRET_ACCESS_KEY"] not in log
