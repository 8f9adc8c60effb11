"""Finding 6: an older signed auto-promote policy put back is refused, on RGW and on the local store.

The operator turns auto-promotion on, then off again (``edgeslim fleet policy``). A bucket writer
puts the older, validly signed ``auto_promote: true`` back at once (and, on the local store, its
file's old modification time too). A fresh controller process reading the policy must refuse it on
one line and fall back to no auto-promotion: each policy carries a version that only grows, and
the last one the controller signed is kept in its signed state in the store.
Real RGW and local stores, real controller processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeslim.deploy.controller import policy_key
from edgeslim.deploy.store import FleetKeys, open_store

pytestmark = pytest.mark.slow


def test_an_older_signed_policy_put_back_is_refused(rgw, s3_url, keys, tmp_path):
    local = tmp_path / "store"
    for url, endpoint in ((s3_url, rgw["S3_ENDPOINT_URL"]), (str(local), None)):
        def cli(*args):
            out = subprocess.run([sys.executable, "-m", "edgeslim", "fleet", "policy", "lab", "--store", url,
                                  *(["--endpoint-url", endpoint] if endpoint else []), "--root", str(keys.root_path),
                                  "--json", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))
            assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
            return json.loads(out.stdout), out.stderr

        key = str(keys.paths["fleet"][0])
        store = open_store(url, endpoint_url=endpoint)
        assert cli("--signing-key", key, "--auto-promote", "true")[0]["auto_promote"] is True
        older = store.get(policy_key(FleetKeys("lab"))).data
        mtime = None if endpoint else os.stat(local / policy_key(FleetKeys("lab"))).st_mtime
        assert cli("--signing-key", key, "--auto-promote", "false")[0]["auto_promote"] is False

        store.put(policy_key(FleetKeys("lab")), older)
        if mtime is not None:
            os.utime(local / policy_key(FleetKeys("lab")), (mtime, mtime))
        shown, log = cli()
        assert shown["auto_promote"] is False, (url, shown)
        assert "version 1" in shown["ignored"] and "put back" in shown["ignored"], shown
        lines = [ln for ln in log.splitlines() if "policy" in ln]
        assert len(lines) == 1 and "ignored" in lines[0] and "no auto-promotion" in lines[0], log
