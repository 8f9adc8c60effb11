"""A run `edgeslim trigger` submitted to Kubeflow settles its own ledger entry when it ends: the
report task turns the parent version's `submitted` into `done` or `rejected` (real MLflow server)."""

from __future__ import annotations

import uuid

import pytest

from edgeslim.components.recipe import load_recipe
from edgeslim.deploy.trigger import DONE, REJECTED, SUBMITTED, ledger_key, settle_submitted, trigger_hash
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture()
def parent(mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    name = f"ledger-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    # the ledger needs a version, not its files: a remote source MLflow takes without reading it
    version = client.create_model_version(name, source=f"s3://edgeslim-tests/{name}/model").version
    recipe = load_recipe(REPO / "pipelines" / "demo_recipe.yaml").with_overrides(source=f"models:/{name}/{version}")
    return client, name, str(version), recipe, ledger_key(trigger_hash(recipe))


def _report(passed: bool) -> dict:
    return {"gate": {"passed": passed, "summary": "top-1 drop 2.10 pt > 1.00"},
            "registered": {"name": "x-edge", "version": "3", "alias": "edge-candidate"} if passed else {},
            "runs": {"kfp_run_id": "6f1c2a9e-0000-4000-8000-000000000001"}}


@pytest.mark.parametrize("passed, state, words", [(True, DONE, "registered x-edge v3 as @edge-candidate"),
                                                   (False, REJECTED, "gate rejected the candidate: top-1 drop")])
def test_a_submitted_entry_ends_done_or_rejected_with_the_kfp_run(parent, passed, state, words):
    client, name, version, recipe, key = parent
    client.set_model_version_tag(name, version, key, SUBMITTED)
    assert settle_submitted(client, recipe, _report(passed)) == state
    tags = client.get_model_version(name, version).tags
    assert tags[key] == state
    assert words in tags[key + ".detail"] and "kfp run 6f1c2a9e-0000-4000-8000-000000000001" in tags[key + ".detail"]


def test_runs_the_trigger_did_not_submit_leave_the_ledger_alone(parent):
    client, name, version, recipe, key = parent
    # `edgeslim submit` or `run` by hand: no ledger entry, none written
    assert settle_submitted(client, recipe, _report(True)) is None
    assert key not in client.get_model_version(name, version).tags
    # an entry that already ended (or failed and waits for a retry) is not rewritten
    client.set_model_version_tag(name, version, key, "failed")
    assert settle_submitted(client, recipe, _report(True)) is None
    assert client.get_model_version(name, version).tags[key] == "failed"
    # a source by alias is not a trigger's compression (the trigger pins the version)
    assert settle_submitted(client, recipe.with_overrides(source=f"models:/{name}@champion"), _report(True)) is None
