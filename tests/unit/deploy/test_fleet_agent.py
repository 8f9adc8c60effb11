"""The device agent on a local store: install, health check, rollback, recovery, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleet_unit_helpers import ManifestWriter, golden_for, make_onnx, upload
from edgeslim.components.common.hashing import file_sha256 as sha256_file
from edgeslim.components.common.version import __version__
from edgeslim.deploy.agent.device import Agent, AgentSettings
from edgeslim.deploy.manifest import manifest_digest
from edgeslim.deploy.store import FleetKeys, StoreUnavailable


def _agent(store, pub, tmp_path, name="d0", **kw) -> Agent:
    a = Agent(store=store, fleet="f", device_id=name, device_class="cls-a", state_dir=tmp_path / name,
              root=pub, settings=AgentSettings(poll_interval=0.01, heartbeat_interval=0.01, **kw))
    a.recover()
    return a


def _running_sha(a: Agent) -> str | None:
    link = a.state_dir / "current"
    return sha256_file(link / "model.onnx") if link.exists() else None


@pytest.fixture
def models(tmp_path):
    good1 = make_onnx(tmp_path / "v1.onnx", seed=1)
    good2 = make_onnx(tmp_path / "v2.onnx", seed=2)
    return good1, good2


def test_install_commits_and_publishes_status(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    art = upload(store, models[0])
    w.send(art, golden_for(models[0]))
    assert a.step() == "applied"
    assert _running_sha(a) == art["sha256"]
    st = store.get_json(FleetKeys("f").status("d0"))[0]["signed"]
    assert st["last"]["result"] == "committed" and st["applied_sequence"] == 1
    assert st["current"]["sha256"] == art["sha256"] and st["current"]["backend"] == "onnxruntime"
    assert st["agent_version"] == __version__
    assert a.step() == "unchanged"  # ETag poll: nothing new


def test_second_install_keeps_previous_and_rollback_manifest_returns_to_it(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    a.step()
    w.send(a2, golden_for(models[1]))
    a.step()
    assert _running_sha(a) == a2["sha256"]
    assert sha256_file(a.state_dir / "previous" / "model.onnx") == a1["sha256"]
    w.send(a1, golden_for(models[0]), action="rollback")
    assert a.step() == "applied"
    assert _running_sha(a) == a1["sha256"]


def test_failed_health_check_rolls_back_on_its_own(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    a.step()
    # v2 with v1's golden outputs: a model that misbehaves on the device.
    w.send(a2, golden_for(models[0]))
    assert a.step() == "rolled_back"
    assert _running_sha(a) == a1["sha256"]
    st = store.get_json(FleetKeys("f").status("d0"))[0]["signed"]
    assert st["last"]["result"] == "rolled_back" and "differs from the golden" in st["last"]["reason"]
    assert a.step() == "unchanged"  # the bad manifest is not retried


def test_model_that_fails_to_load_is_rolled_back(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1 = upload(store, models[0])
    w.send(a1, golden_for(models[0]))
    a.step()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model at all")
    w.send(upload(store, broken), golden_for(models[0]))
    assert a.step() == "rolled_back"
    assert _running_sha(a) == a1["sha256"]


def test_replayed_and_expired_manifests_are_refused_and_nothing_changes(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    old = w.send(a1, golden_for(models[0]))
    a.step()
    w.send(a2, golden_for(models[1]))
    a.step()
    w.publish(old)  # an attacker with write access puts back the older, validly signed manifest
    assert a.step() == "rejected"
    assert _running_sha(a) == a2["sha256"]
    st = store.get_json(FleetKeys("f").status("d0"))[0]["signed"]
    assert st["rejected"]["reason"] == "replay"
    w.send(a1, golden_for(models[0]), expires_in=-5)
    assert a.step() == "rejected"
    assert store.get_json(FleetKeys("f").status("d0"))[0]["signed"]["rejected"]["reason"] == "expired"
    assert _running_sha(a) == a2["sha256"]


def test_corrupt_artifact_in_the_store_is_discarded(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    a.step()
    store.put(a2["key"], Path(models[0]).read_bytes())  # the object no longer matches its hash
    w.send(a2, golden_for(models[1]))
    assert a.step() == "failed"
    assert _running_sha(a) == a1["sha256"]
    assert not list((a.state_dir / "partial").iterdir())
    assert "sha256" in store.get_json(FleetKeys("f").status("d0"))[0]["signed"]["last"]["reason"]


def test_download_resumes_from_a_partial_file(store, keys, tmp_path, models, monkeypatch):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    big = make_onnx(tmp_path / "big.onnx", seed=3, n_in=256, n_out=256)
    art = upload(store, big)
    data = big.read_bytes()
    (a.state_dir / "partial" / f"{art['sha256']}.part").write_bytes(data[:100_000])
    starts = []
    real = store.stream
    monkeypatch.setattr(store, "stream", lambda key, start=0, chunk_size=65536: (starts.append(start),
                                                                                 real(key, start, chunk_size))[1])
    w.send(art, golden_for(big, n_in=256))
    assert a.step() == "applied"
    assert starts == [100_000]
    assert _running_sha(a) == art["sha256"]


def test_startup_undoes_a_half_done_swap_then_applies_again(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    a.step()
    old = os.readlink(a.state_dir / "current")
    m2 = w.manifest(a2, golden_for(models[1]))
    rel = a.make_release(m2)
    # What a crash right after the swap leaves: the journal, and current on the new release.
    (a.state_dir / "swap.json").write_text(json.dumps(
        {"sequence": m2.sequence, "from": old, "to": rel, "previous_before": None}))
    os.unlink(a.state_dir / "current")
    os.symlink(rel, a.state_dir / "current")
    b = _agent(store, pub, tmp_path)  # restart
    assert os.readlink(b.state_dir / "current") == old and not (b.state_dir / "swap.json").exists()
    w.publish(m2.sign(priv.fleet_key))
    assert b.step() == "applied"
    assert _running_sha(b) == a2["sha256"]


def test_startup_keeps_a_swap_that_was_already_committed(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    a.step()
    old = os.readlink(a.state_dir / "current")
    w.send(a2, golden_for(models[1]))
    a.step()
    new = os.readlink(a.state_dir / "current")
    # Crash between recording the commit and removing the journal.
    (a.state_dir / "swap.json").write_text(json.dumps(
        {"sequence": 2, "from": old, "to": new, "previous_before": None}))
    b = _agent(store, pub, tmp_path)
    assert os.readlink(b.state_dir / "current") == new and not (b.state_dir / "swap.json").exists()


def test_withdraw_removes_the_model_and_keeps_previous(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1 = upload(store, models[0])
    w.send(a1, golden_for(models[0]))
    a.step()
    w.send(None, None, action="withdraw")
    assert a.step() == "applied"
    assert not (a.state_dir / "current").exists()
    assert sha256_file(a.state_dir / "previous" / "model.onnx") == a1["sha256"]


class _DownStore:
    """A store that is unreachable: every call raises, as boto3 does on connection refused."""

    def describe(self):
        return "s3://down"

    def __getattr__(self, name):
        def fail(*a, **k):
            raise StoreUnavailable("s3://down: cannot reach the store (EndpointConnectionError)")
        return fail


def test_unreachable_store_backs_off_and_keeps_serving(store, keys, tmp_path, models, caplog):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1 = upload(store, models[0])
    w.send(a1, golden_for(models[0]))
    a.step()
    a.store = _DownStore()
    a.settings = dataclasses.replace(a.settings, max_backoff=0.16)
    caplog.set_level(logging.WARNING, "edgeslim.agent")
    t = threading.Thread(target=a.run)

    def delays():
        return [float(r.getMessage().rsplit(" in ", 1)[1].rstrip("s")) for r in list(caplog.records)
                if "store unreachable" in r.getMessage()]

    t.start()
    # Until the back-off has reached its cap (the deadline only stops a hang).
    deadline = time.monotonic() + 300
    while not (len(delays()) >= 3 and 0.16 in delays()) and time.monotonic() < deadline:
        time.sleep(0.05)
    a.stop()
    t.join(60)
    delays = delays()
    assert len(delays) >= 3
    assert max(delays) <= 0.16 and max(delays) > 0.02  # grew from the 0.01 poll, capped
    assert _running_sha(a) == a1["sha256"]
    local = json.loads((a.state_dir / "status.json").read_text())
    assert local["state"] == "offline" and local["current"]["sha256"] == a1["sha256"]


def test_agent_import_stays_light():
    code = ("import sys, edgeslim.deploy.agent.device; "
            "print(sorted(m for m in ('torch','mlflow','kfp','onnxruntime','numpy','boto3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_mocked_tensorrt_builds_an_engine_once_on_first_install(store, keys, tmp_path, models, monkeypatch):
    """MOCKED: TensorRT cannot run here (no GPU); the builder is replaced to check the agent's side only."""
    from edgeslim.components.engine import builder as engine_mod
    from edgeslim.components.engine import tensorrt_calls

    builds = []

    class Built:
        def __init__(self, path):
            self.engine_path, self.metadata = path, {"mocked": True}

    def fake_build(onnx_path, out_dir, device_class, config=None):
        builds.append((Path(onnx_path).name, device_class))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        p = Path(out_dir) / "model.engine"
        p.write_bytes(b"mocked engine for " + device_class.encode())
        return Built(p)

    monkeypatch.setattr(tensorrt_calls, "tensorrt_available", lambda: (True, "mocked"))
    monkeypatch.setattr(engine_mod, "build_engine", fake_build)
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    art = upload(store, models[0])
    w.send(art, golden_for(models[0]))
    assert a.step() == "applied"
    assert builds == [(art["sha256"], "cls-a")]
    assert (a.state_dir / "current" / "model.engine").read_bytes() == b"mocked engine for cls-a"
    meta = json.loads((a.state_dir / "current" / "release.json").read_text())
    assert meta["backend"] == "tensorrt (engine built on device)"
    w.send(art, golden_for(models[0]), action="rollback")  # same artifact again: no second build
    a.step()
    assert len(builds) == 1


def test_failed_engine_build_falls_back_to_onnxruntime(store, keys, tmp_path, models, monkeypatch):
    """MOCKED TensorRT: the build raises; the device still installs and serves the ONNX."""
    from edgeslim.components.engine import builder as engine_mod
    from edgeslim.components.engine import tensorrt_calls

    monkeypatch.setattr(tensorrt_calls, "tensorrt_available", lambda: (True, "mocked"))

    def boom(*a, **k):
        raise RuntimeError("mocked builder failure")

    monkeypatch.setattr(engine_mod, "build_engine", boom)
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    art = upload(store, models[0])
    w.send(art, golden_for(models[0]))
    assert a.step() == "applied"
    assert not (a.state_dir / "current" / "model.engine").exists()
    assert json.loads((a.state_dir / "current" / "release.json").read_text())["backend"] == "onnxruntime"


def test_an_unexpected_error_in_a_poll_is_logged_undone_and_retried(store, keys, tmp_path, models, caplog,
                                                                    monkeypatch):
    """A bug mid-apply (here: the health check raises once, after the swap) does not stop the loop:
    one ERROR line without a traceback, the half-done swap is undone, the manifest is applied again."""
    from edgeslim.deploy.agent import health

    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    assert a.step() == "applied"
    real, calls = health.check_in_subprocess, []

    def flaky(*args, **kw):
        calls.append(os.readlink(a.state_dir / "current"))
        if len(calls) == 1:
            raise RuntimeError("injected bug\nin the health check")
        return real(*args, **kw)

    monkeypatch.setattr(health, "check_in_subprocess", flaky)
    w.send(a2, golden_for(models[1]))
    a.settings = dataclasses.replace(a.settings, max_backoff=0.05)
    caplog.set_level(logging.INFO, "edgeslim.agent")
    t = threading.Thread(target=a.run)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while _running_sha(a) != a2["sha256"] or a.state["applied_sequence"] != 2:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.02)
    finally:
        a.stop()
        t.join(10)
    failed = [r for r in caplog.records if "poll failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert "RuntimeError: injected bug in the health check" in failed[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.INFO)
    assert "undid a half-done swap to sequence 2" in caplog.text
    assert len(calls) == 2 and a.state["last"]["result"] == "committed"


def test_crash_between_the_floor_and_agent_json_still_retries_the_manifest(store, keys, tmp_path, models):
    """``sequence-floor`` is written before agent.json: a crash in between must not turn the
    undecided swap's manifest into a replay."""
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    a.step()
    old = os.readlink(a.state_dir / "current")
    m2 = w.manifest(a2, golden_for(models[1]))
    rel = a.make_release(m2)
    (a.state_dir / "swap.json").write_text(json.dumps(
        {"sequence": m2.sequence, "from": old, "to": rel, "previous_before": None}))
    os.unlink(a.state_dir / "current")
    os.symlink(rel, a.state_dir / "current")
    (a.state_dir / "sequence-floor").write_text(json.dumps({"sequence": 2, "manifest_sha256": None}))
    b = _agent(store, pub, tmp_path)  # restart
    assert os.readlink(b.state_dir / "current") == old and b.state["applied_sequence"] == 1
    w.publish(m2.sign(priv.fleet_key))
    assert b.step() == "applied"
    assert _running_sha(b) == a2["sha256"]


def test_losing_agent_json_and_the_floor_file_keeps_the_floor_from_the_releases(store, keys, tmp_path, models,
                                                                                  caplog):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    old = w.send(a1, golden_for(models[0]))
    a.step()
    w.send(a2, golden_for(models[1]))
    a.step()
    assert json.loads((a.state_dir / "current" / "release.json").read_text())["sequence"] == 2
    (a.state_dir / "agent.json").unlink()
    (a.state_dir / "sequence-floor").unlink()
    caplog.set_level(logging.WARNING, "edgeslim.agent")
    b = _agent(store, pub, tmp_path)
    assert b.state["applied_sequence"] == 2 and "agent.json is missing; recovered the sequence floor 2" in caplog.text
    w.publish(old)
    assert b.step() == "rejected"
    assert store.get_json(FleetKeys("f").status("d0"))[0]["signed"]["rejected"]["reason"] == "replay"
    assert _running_sha(b) == a2["sha256"]


def test_missing_artifact_fails_the_sequence_once(store, keys, tmp_path, models):
    priv, pub = keys
    w = ManifestWriter(store, priv)
    a = _agent(store, pub, tmp_path)
    a1, a2 = upload(store, models[0]), upload(store, models[1])
    w.send(a1, golden_for(models[0]))
    a.step()
    store.delete(a2["key"])
    env = w.send(a2, golden_for(models[1]))
    assert a.step() == "failed"
    st = store.get_json(FleetKeys("f").status("d0"))[0]["signed"]
    assert st["state"] == "idle" and a2["key"] in st["last"]["reason"] and "not in the store" in st["last"]["reason"]
    assert st["last"]["manifest_sha256"] == manifest_digest(env["signed"]) and st["applied_sequence"] == 2
    assert _running_sha(a) == a1["sha256"]
    assert a.step() == "unchanged"  # not retried
