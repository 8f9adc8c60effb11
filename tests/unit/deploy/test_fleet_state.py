"""The controller's signed state: ends recorded by rollout id, a counter that only grows, older copies refused."""

from __future__ import annotations

import pytest

from edgeslim.deploy.controller import UntrustedRecord
from edgeslim.deploy.fleet_state import StaleState


def _rec(name, uid, state="pending", generation=1):
    return {"name": name, "fleet": "f", "state": state, "generation": generation, "rollout_uid": uid,
            "model": {"name": "m", "version": "1"}}


def test_an_ended_rollout_put_back_is_refused_and_an_older_state_too(store, keys, caplog):
    c = keys.controller(store)
    c.records.save(_rec("r1", "a1"))
    pending = store.get("fleets/f/rollouts/r1.json").data
    c.records.save(_rec("r1", "a1", "aborted"))
    state = store.get(c.state.key).data
    assert c.state.read()["ended"]["a1"]["state"] == "aborted" and c.state.floor == 1
    # The same name, another generation (another rollout id), ends too: both ends are kept.
    fresh = keys.controller(store)
    fresh.records.get("r1")
    fresh.records.save(_rec("r1", "a2", "succeeded", generation=2))
    assert set(c.state.read()["ended"]) == {"a1", "a2"} and c.state.floor == 2

    store.put("fleets/f/rollouts/r1.json", pending)  # the aborted generation's pending record, put back
    with pytest.raises(UntrustedRecord, match="records generation 1 as aborted.*a replay"):
        keys.controller(store).get("r1")
    caplog.set_level("ERROR", logger="edgeslim.controller")
    assert keys.controller(store).list() == [] and "a replay" in caplog.text

    store.put(c.state.key, state)  # an older state: refused by a controller that read the newer one
    with pytest.raises(StaleState, match="counter 1, below the 2"):
        c.state.read()
    with pytest.raises(UntrustedRecord, match="an older copy was put back"):
        c.get("r1")  # an active record is not returned while the state cannot be trusted...
    assert c.records.get("r1", stale_ok=True)["state"] == "pending"  # ...except to abort it
    store.delete(c.state.key)
    with pytest.raises(StaleState, match="deleted"):
        c.state.read()


def test_a_garbled_state_never_blocks_an_abort(store, keys, caplog):
    from edgeslim.deploy.controller import WaveRolloutConfig

    c = keys.controller(store)
    c.registry.tag = lambda rec: None  # no MLflow here
    c.records.save({**_rec("r1", "b1"), "config": WaveRolloutConfig().to_dict(), "devices": {}})
    store.put(c.state.key, b"{not json")
    caplog.set_level("ERROR", logger="edgeslim.controller")
    assert c.abort("r1", "operator said no")["state"] == "aborted"  # the end replaces the garbled state
    assert c.state.read()["ended"]["b1"]["state"] == "aborted"
    assert [ln for ln in caplog.text.splitlines() if "replacing it" in ln] and "Traceback" not in caplog.text
