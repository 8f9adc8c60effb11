"""Fixtures of the fleet unit tests (helpers are in fleet_unit_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def keys(tmp_path):
    from edgeslim.deploy import signing

    priv, pub = signing.generate_keypair(tmp_path / "keys")
    return signing.load_private_key(priv), signing.load_public_keys(pub)


@pytest.fixture
def store(tmp_path):
    from edgeslim.deploy.store import LocalStore

    return LocalStore(tmp_path / "store")
