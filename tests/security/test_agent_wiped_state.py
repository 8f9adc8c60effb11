"""Round two, finding 5: a device whose whole state directory is wiped installed a replayed older manifest.

Its own replay floor is gone with the directory, so the floor must come from the fleet: the
controller re-signs, with every timestamp, a short-lived statement of the newest manifest sequence
it sent to each device (``fleets/<F>/sequences.json``, fleet role). A device with no floor of its
own refuses a manifest below it; with the statement expired (or missing) it installs nothing and
says so in one line, and installs once the controller has published a fresh one. A device with a
floor of its own also refuses a manifest the statement shows was superseded while it was away.
Real agent process, real controller, local store.
"""

from __future__ import annotations

import shutil
import time

import pytest

from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")


def test_a_wiped_device_refuses_a_replay_and_installs_nothing_without_a_fresh_statement(local_fleet, tmp_path):
    pub, store = local_fleet.publisher, local_fleet.store
    paths = [make_onnx(tmp_path / f"v{i}.onnx", seed=40 + i) for i in (1, 2, 3)]
    v1, v2, v3 = (pub.upload(p) for p in paths)
    dev = local_fleet.agent("wipe0")
    first = pub.manifest("wipe0", ORIN, 1, v1, pub.golden(paths[0]))
    pub.publish("wipe0", first)
    wait_for(lambda: dev.running_sha() == v1["sha256"], 60, "v1 installed")
    pub.publish("wipe0", pub.manifest("wipe0", ORIN, 2, v2, pub.golden(paths[1])))
    wait_for(lambda: (pub.status("wipe0").get("last") or {}).get("sequence") == 2, 60, "v2 installed")
    # The controller's statement: re-signed with its timestamp, it names sequence 2 for wipe0.
    st = local_fleet.controller().publish_timestamp()
    assert st["root_version"] == 1
    assert store.get_json(K.sequences)[0]["signed"]["sequences"]["wipe0"] == 2

    def wipe_and_restart(manifest: dict) -> tuple[int, str]:
        """The device loses its whole state directory; ``manifest`` is in the store when it starts."""
        dev.stop()
        shutil.rmtree(dev.state_dir)
        etag = store.put_json(K.manifest("wipe0"), manifest)
        since = len(dev.lines)
        dev.start()
        return since, etag

    # A bucket writer puts the older, validly signed manifest back; the device lost everything.
    since, etag = wipe_and_restart(first)
    got = wait_for(lambda: (pub.status("wipe0").get("rejected") or {}).get("etag") == etag
                   and pub.status("wipe0"), 60, "the wiped device to refuse the replay")
    assert got["rejected"]["reason"] == "replay" and "sequence statement" in got["rejected"]["message"], got
    assert dev.running_sha() is None and got["applied_sequence"] == 0
    assert sum("refused manifest" in line for line in dev.lines[since:]) == 1

    # The statement expires (no controller re-signs it): a wiped device installs nothing, in one line,
    # even the newest manifest; once the controller publishes again, it installs that one.
    local_fleet.controller(timestamp_ttl_s=0.5).publish_timestamp()
    expires = store.get_json(K.sequences)[0]["signed"]["expires_at"]
    wait_for(lambda: time.time() > expires + 0.5, 30, "the statement to expire")
    since, _ = wipe_and_restart(pub.manifest("wipe0", ORIN, 3, v3, pub.golden(paths[2])))
    got = wait_for(lambda: (pub.status("wipe0").get("rejected") or {}).get("reason") == "no-floor"
                   and pub.status("wipe0"), 60, "the device to hold the manifest")
    assert "expired" in got["rejected"]["message"] and dev.saw("holding manifest", since), got
    assert dev.running_sha() is None
    local_fleet.controller().publish_timestamp()
    wait_for(lambda: (pub.status("wipe0").get("last") or {}).get("result") == "committed"
             and pub.status("wipe0")["last"]["sequence"] == 3, 60, "v3 committed under a fresh statement")
    assert dev.running_sha() == v3["sha256"]
    assert sum("holding manifest" in line for line in dev.lines[since:]) == 1

    # A device with a floor of its own (3), offline while the fleet sent it 4 then 5: the older 4,
    # put back while it was away, is above its own floor but below the statement, and refused.
    dev.stop()
    fourth = pub.manifest("wipe0", ORIN, 4, v1, pub.golden(paths[0]))
    pub.publish("wipe0", fourth)
    pub.publish("wipe0", pub.manifest("wipe0", ORIN, 5, v2, pub.golden(paths[1])))
    etag = store.put_json(K.manifest("wipe0"), fourth)
    dev.start()
    got = wait_for(lambda: (pub.status("wipe0").get("rejected") or {}).get("etag") == etag
                   and pub.status("wipe0"), 60, "the device to refuse the superseded manifest")
    assert got["rejected"]["reason"] == "replay" and "below 5" in got["rejected"]["message"], got
    assert dev.running_sha() == v3["sha256"] and got["applied_sequence"] == 3
    assert not dev.saw("Traceback") and dev.proc.poll() is None
