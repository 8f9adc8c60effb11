"""Fixtures of the fleet unit tests (helpers are in fleet_unit_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def keys(tmp_path):
    """The fleet's four roles and its root (unpacks as ``kit, root``: tests/fleet_trust.py)."""
    from tests.fleet_trust import TrustKit

    return TrustKit(tmp_path / "keys", fleet="f")


@pytest.fixture
def store(tmp_path):
    from edgeslim.deploy.store import LocalStore

    return LocalStore(tmp_path / "store")
