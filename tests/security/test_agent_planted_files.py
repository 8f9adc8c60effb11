"""Round two, finding 8: links and files planted in the agent's state directory.

Someone who can write into the state directory (but is not the agent's user) plants, before a
real agent process starts and installs v1 from a local store:

- ``partial/<sha>.part`` as a link to a file outside: the download must not append to it;
- ``releases/.<name>.tmp`` and ``releases/<name>`` as links to a directory outside: building
  the release must not delete the files in it;
- ``.agent.json.tmp`` as a link to a file outside: saving the state must not overwrite it;
- ``.device.key.tmp`` as a link to a file outside: the new device key must not be written there;
- ``objects/sha256/<sha>`` holding another model under v1's name, owned by another user: it must
  not be installed (what is installed is hashed at install time);
- a directory at ``.current.new``: it must not block the swap.

And a device key that is a link is never read: the agent refuses to start, in one line.
Each refusal is one line in the agent's log, never a traceback.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.fleet_it_helpers import make_onnx, wait_for

pytestmark = pytest.mark.slow
ORIN = "orin-sm87-jp6.1-trt10.3"
NOBODY = 65534


def test_planted_links_and_files_in_the_state_dir_are_refused_and_never_followed(local_fleet, tmp_path):
    pub = local_fleet.publisher
    v1_path, evil_path = make_onnx(tmp_path / "v1.onnx", seed=31), make_onnx(tmp_path / "evil.onnx", seed=32)
    v1 = pub.upload(v1_path)
    sha = v1["sha256"]

    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    victims = {outside / "appended.txt": b"keep me\n", outside / "overwritten.txt": b"keep me too\n",
               outside / "dir" / "a.txt": b"a\n", outside / "dir" / "b.txt": b"b\n",
               outside / "readable-by-the-planter.txt": b"no key in here\n"}
    for p, data in victims.items():
        p.write_bytes(data)

    dev = local_fleet.agent("plant0", start=False)
    d = dev.state_dir
    for sub in ("partial", "releases", "objects/sha256"):
        (d / sub).mkdir(parents=True)
    os.symlink(outside / "appended.txt", d / "partial" / f"{sha}.part")
    os.symlink(outside / "dir", d / "releases" / f".{sha[:20]}.tmp")
    os.symlink(outside / "dir", d / "releases" / sha[:20])
    os.symlink(outside / "overwritten.txt", d / ".agent.json.tmp")
    os.symlink(outside / "readable-by-the-planter.txt", d / ".device.key.tmp")  # where the new key is written
    planted = d / "objects" / "sha256" / sha
    planted.write_bytes(evil_path.read_bytes())
    os.chown(planted, NOBODY, NOBODY)
    (d / ".current.new").mkdir()
    (d / ".current.new" / "x").write_text("blocks a rename onto it")

    dev.start()
    pub.publish("plant0", pub.manifest("plant0", ORIN, 1, v1, pub.golden(v1_path)))
    wait_for(lambda: (pub.status("plant0").get("last") or {}).get("sequence") == 1, 60, "v1 decided")
    assert pub.status("plant0")["last"]["result"] == "committed", pub.status("plant0")["last"]
    assert dev.running_sha() == sha  # v1, never the planted model under its name
    assert hashlib.sha256((d / "current" / "model.onnx").read_bytes()).hexdigest() == sha

    for p, data in victims.items():  # nothing outside was appended to, overwritten or deleted
        assert p.read_bytes() == data, p
    assert not os.path.islink(d / "releases" / sha[:20]) and not os.path.islink(d / "agent.json")
    assert not os.path.islink(d / "device.key") and os.stat(d / "device.key").st_mode & 0o777 == 0o600
    assert not os.path.lexists(d / ".current.new") and not os.path.lexists(d / ".agent.json.tmp")
    assert os.stat(d / "objects" / "sha256" / sha).st_uid == os.geteuid()
    assert dev.saw(f"objects/sha256/{sha[:12]} refused") and dev.saw(f"belongs to uid {NOBODY}")
    assert dev.saw(f"refused the partial download ({d}/partial/{sha}.part is a symbolic link")
    assert dev.saw(".current.new, a directory")
    assert not dev.saw("Traceback")

    # The device key through a link: the agent refuses to start, in one line.
    dev.stop()
    stolen = tmp_path / "outside" / "someone-elses.key"
    os.replace(d / "device.key", stolen)
    os.symlink(stolen, d / "device.key")
    out = subprocess.run(dev.args + ["--once"], capture_output=True, text=True, timeout=120, env=dev.env)
    assert out.returncode != 0
    assert "refused to read device key" in out.stderr and "symbolic link" in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
