"""A fleet's keys and root for tests: root, release, fleet and approver roles, as `edgeslim fleet` makes them."""

from __future__ import annotations

import json
from pathlib import Path


class TrustKit:
    """Keys of the four roles (one each), root version 1 signed and written to ``root.json``.

    Unpacks as ``(kit, root)`` for tests written as ``priv, pub = keys``: the kit signs
    (fleet and release), the :class:`~edgeslim.deploy.trust.Root` verifies.
    """

    def __init__(self, directory: Path, fleet: str = "f") -> None:
        from edgeslim.deploy import signing, trust

        self.dir = Path(directory)
        self.fleet = fleet
        roles = ("root", "release", "fleet", "approver")
        paths = {role: signing.generate_keypair(self.dir, role=role) for role in roles}
        self.paths = paths
        self.root_key, self.release_key, self.fleet_key, self.approver_key = (
            signing.load_private_key(paths[r][0]) for r in roles)
        payload = trust.make_root(root_keys=[self.root_key], release_keys=[self.release_key],
                                  fleet_keys=[self.fleet_key], approver_keys=[self.approver_key], fleet=fleet)
        self.root_envelope = trust.sign_with(payload, [self.root_key])
        self.root_path = self.dir / "root.json"
        self.root_path.write_text(json.dumps(self.root_envelope))
        self.root = trust.Root(payload)

    def __iter__(self):
        return iter((self, self.root))

    def release(self, artifact: dict, *, name: str = "m", version: str = "1", engines: dict | None = None,
                expires_s: float = 3600.0) -> dict:
        """A release statement (envelope) for ``artifact``, signed by the release key."""
        from edgeslim.deploy import trust

        payload = trust.release_payload(name=name, version=str(version), artifact=artifact, engines=engines or {},
                                        gate={"passed": True, "summary": "test gate"}, expires_s=expires_s)
        return trust.sign_with(payload, [self.release_key])

    def controller(self, store, **kw):
        from edgeslim.deploy.controller import Controller

        return Controller(store, self.fleet, signing_key=self.fleet_key, root=self.root, **kw)

    def enrol(self, store, agents) -> None:
        """Enrol agents (in-process :class:`Agent` objects) in the fleet's signed inventory."""
        self.controller(store).enrol_many({a.device_id: (a.device_class, a.public_key) for a in agents})
