"""Round two, finding 7: a retired fleet key still worked for a new device.

The fleet rotated: root version 2 names a new fleet key, and the controller signs with it. A new
device is provisioned with the old root.json (version 1). A bucket writer who also holds the
retired fleet key garbles ``root/2``, then deletes it, and sends the device a manifest (and a
sequence statement) signed by the retired key. Root chain errors fail closed: the device installs
nothing while ``root/2`` does not verify, nor while the fleet's timestamp (signed by the new key)
does not verify under the root it holds, nor while a newer root sits past a gap; each is one line.
Once ``root/2`` is back, the device follows it, refuses the retired key's manifest, and installs
what the new key signs.
Real agent process, real controller, local store.
"""

from __future__ import annotations

import pytest

from edgeslim.deploy import signing, trust
from edgeslim.deploy.controller import Controller
from edgeslim.deploy.store import FleetKeys
from tests.fleet_it_helpers import Publisher, make_onnx, wait_for

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"
K = FleetKeys("lab")


def test_a_device_behind_a_broken_root_chain_installs_nothing_signed_by_the_retired_key(local_fleet, tmp_path):
    keys, store, old = local_fleet.keys, local_fleet.store, local_fleet.publisher
    new_root = signing.load_private_key(signing.generate_keypair(tmp_path / "new-root", role="root")[0])
    new_fleet = signing.load_private_key(signing.generate_keypair(tmp_path / "new-fleet", role="fleet")[0])
    payload = trust.make_root(root_keys=[new_root], release_keys=[keys.release_key], fleet_keys=[new_fleet],
                              version=2, fleet="lab")
    root2 = trust.sign_with(payload, [keys.root_key, new_root])
    store.put_json(K.root(2), root2)
    Controller(store, "lab", signing_key=new_fleet, root=keys.root).publish_timestamp()  # by the new key

    v1_path, v2_path = make_onnx(tmp_path / "v1.onnx", seed=51), make_onnx(tmp_path / "v2.onnx", seed=52)
    v1, v2 = old.upload(v1_path), old.upload(v2_path)

    def held(reason_text: str):
        got = old.status("new0")
        rej = got.get("rejected") or {}
        return rej.get("reason") == "root" and reason_text in rej.get("message", "") and got

    store.put(K.root(2), b'{"signed": garbled')
    dev = local_fleet.agent("new0")  # provisioned with root version 1
    old.publish("new0", old.manifest("new0", ORIN, 5, v1, old.golden(v1_path)))  # the retired key signs it
    got = wait_for(lambda: held("refused a new root (version 2)"), 60, "a hold on the garbled root/2")
    assert got["current"] is None and got["metadata"]["root_version"] == 1

    store.delete(K.root(2))  # deleted: the timestamp the new key signed still says the chain moved on
    got = wait_for(lambda: held("refused the fleet timestamp"), 60, "a hold on the unverifiable timestamp")
    assert got["current"] is None

    store.put_json(K.root(3), root2)  # a newer root past a gap (any content): the chain stops short of it
    got = wait_for(lambda: held("root version 3 is in the store"), 60, "a hold on the gap")
    assert got["current"] is None and dev.running_sha() is None

    dev.stop()  # the chain verifies again (mended while the device is down: no half-mended chain is seen)
    store.delete(K.root(3))
    store.put_json(K.root(2), root2)
    dev.start()
    rotated = Controller(store, "lab", signing_key=new_fleet, root=keys.root)
    rotated.publish_timestamp()
    got = wait_for(lambda: (old.status("new0").get("metadata") or {}).get("root_version") == 2
                   and (old.status("new0").get("rejected") or {}).get("reason") == "signature" and old.status("new0"),
                   60, "the device to follow root 2 and refuse the retired key's manifest")
    assert got["current"] is None
    new = Publisher(store, keys)
    new.key = new_fleet
    new.publish("new0", new.manifest("new0", ORIN, 6, v2, new.golden(v2_path)))
    wait_for(lambda: dev.running_sha() == v2["sha256"], 60, "v2 installed under the new fleet key")
    for text in ("refused a new root (version 2)", "refused the fleet timestamp", "root version 3 is in the store"):
        assert sum("holding manifest" in line and text in line for line in dev.lines) == 1, text
    assert not dev.saw("Traceback") and dev.proc.poll() is None
