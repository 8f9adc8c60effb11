"""The fleet's devices as the controller sees them.

Enrolment is the fleet key's signed inventory (id -> class and public key); a device's
registration and statuses count only when signed by the key it was enrolled with, and the
store path they live under (never their own claim) names the device.
"""

from __future__ import annotations

import logging
from typing import Any

from edgeslim.components.common.errors import FleetError
from edgeslim.deploy import bounded, signing, trust
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.fleet_trust import FleetTrust
from edgeslim.deploy.store import PreconditionFailed, check_name

log = logging.getLogger("edgeslim.controller")


class FleetDevices(FleetPart):
    """Enrolment, registrations and signed statuses of the fleet's devices."""

    def __init__(self, ctx: FleetContext, fleet_trust: FleetTrust) -> None:
        super().__init__(ctx)
        self.fleet_trust = fleet_trust

    def inventory(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        """Enrolled devices (id -> class and public key) as the fleet key signed them, and the ETag."""
        try:
            got = self.fleet_trust.verified(self.keys.inventory, "device inventory")
        except signing.SignatureError as exc:
            raise signing.SignatureError(f"{exc}; if the root rotated the fleet key, enrol the devices again "
                                         "(`edgeslim fleet enrol FLEET DEVICE`)") from None
        if got is None:
            return {}, None
        inv, etag = got
        if inv.get("type") != trust.INVENTORY_TYPE or inv.get("fleet") != self.fleet:
            raise signing.SignatureError(f"device inventory is for {inv.get('fleet')!r}, not {self.fleet!r}")
        return dict(inv.get("devices") or {}), etag

    def _inventory_for_write(self) -> tuple[dict[str, Any], str | None]:
        """The inventory to enrol into. One that no current fleet key signed (a root rotation retired the
        key that signed it, or it was garbled) is started afresh, fenced on the stored object: every
        device is then enrolled again, from its own signed registration."""
        try:
            return self.inventory()
        except (signing.SignatureError, bounded.BoundedInputError) as exc:
            log.warning("device inventory not trusted (%s); starting a new one: enrol every device again", exc)
            head = self.store.head(self.keys.inventory)
            return {}, head[1] if head else None

    def enrol(self, device_id: str, device_class: str | None = None, public_key: str | None = None) -> dict[str, Any]:
        """Add a device to the signed inventory; class and key default to its registration's."""
        self.fleet_trust.require_key()
        check_name("device", device_id)
        if public_key is None or device_class is None:
            reg = self.registrations().get(device_id)
            if reg is None:
                raise FleetError(f"device {device_id!r} has not registered in fleet {self.fleet!r}; start its "
                                 "agent first, or pass --class and --public-key")
            public_key = public_key or reg["public_key"]
            device_class = device_class or reg["device_class"]
        trust.public_from_b64(public_key)
        devices, etag = self._inventory_for_write()
        devices[device_id] = {"device_class": device_class, "public_key": public_key, "enrolled_at": self.clock()}
        return self._write_inventory(devices, etag)[device_id]

    def enrol_many(self, entries: dict[str, tuple[str, str]]) -> None:
        """Enrol several devices in one inventory write: ``{device_id: (class, public key b64)}``."""
        self.fleet_trust.require_key()
        devices, etag = self._inventory_for_write()
        for dev, (cls, pub) in entries.items():
            check_name("device", dev)
            trust.public_from_b64(pub)
            devices[dev] = {"device_class": cls, "public_key": pub, "enrolled_at": self.clock()}
        self._write_inventory(devices, etag)

    def _write_inventory(self, devices: dict[str, Any], etag: str | None) -> dict[str, Any]:
        inv = {"type": trust.INVENTORY_TYPE, "fleet": self.fleet, "devices": devices, "updated_at": self.clock()}
        try:
            if etag is None:
                self.store.put_json(self.keys.inventory, self.fleet_trust.sign(inv), if_none_match_any=True)
            else:
                self.store.put_json(self.keys.inventory, self.fleet_trust.sign(inv), if_match=etag)
        except PreconditionFailed:
            raise FleetError("the device inventory changed while enrolling; run the command again") from None
        return devices

    def registrations(self) -> dict[str, dict[str, Any]]:
        """Self-signed registrations, each keyed by the store path it lives under (never by its claim)."""
        regs: dict[str, dict[str, Any]] = {}
        for key in self.store.list(self.keys.devices_prefix):
            if not key.endswith("/registration.json"):
                continue
            dev = key.split("/")[-2]
            try:
                env, _ = self.fleet_trust.read(key, f"registration of {dev}") or (None, None)
                if env is None:
                    continue
                claimed = env.get("signed", {}) if isinstance(env, dict) else {}
                reg = trust.verify_device(env, str(claimed.get("public_key")), what=f"registration of {dev}")
                if reg.get("device_id") != dev or reg.get("fleet") != self.fleet:
                    raise FleetError(f"registration under {key} claims {reg.get('fleet')}/{reg.get('device_id')}")
                regs[dev] = reg
            except (FleetError, AttributeError) as exc:
                log.warning("ignoring registration %s: %s", key, exc)
        return regs

    def device_status(self, dev: str, public_key: str) -> dict[str, Any] | None:
        """The device's latest status if its own enrolled key signed it; else ``None`` (logged)."""
        try:
            got = self.fleet_trust.read(self.keys.status(dev), f"status of {dev}", bounded.MAX_STATUS_BYTES)
            if got is None:
                return None
            st = trust.verify_device(got[0], public_key, what=f"status of {dev}")
            if st.get("device_id") != dev:
                raise FleetError(f"status signed by {dev}'s key claims to be {st.get('device_id')!r}")
            return st
        except (FleetError, AttributeError) as exc:
            log.warning("device %s: status ignored: %s", dev, exc)
            return None

    def devices(self) -> dict[str, dict[str, Any]]:
        """Enrolled, registered devices with their verified status (``None`` if none yet).

        The device class is the inventory's, never the registration's claim.
        """
        inv, _ = self.inventory()
        regs = self.registrations()
        out: dict[str, dict[str, Any]] = {}
        for dev, entry in sorted(inv.items()):
            reg = regs.get(dev)
            if reg is None:
                continue
            if reg.get("public_key") != entry.get("public_key") or reg.get("device_class") != entry.get("device_class"):
                log.warning("device %s: registration does not match its enrolment (key or class); not a target", dev)
                continue
            out[dev] = {"device_class": entry["device_class"], "public_key": entry["public_key"],
                        "registration": reg, "status": self.device_status(dev, entry["public_key"])}
        return out

    def pending(self) -> dict[str, dict[str, Any]]:
        """Registered devices that are not enrolled yet (for `edgeslim fleet enrol`)."""
        inv, _ = self.inventory()
        return {d: {"device_class": r.get("device_class"), "public_key": r.get("public_key"),
                    "fingerprint": trust.key_id(trust.public_from_b64(r["public_key"]))}
                for d, r in self.registrations().items() if d not in inv}


def sequence_number(value: Any) -> int:
    """A sequence number from untrusted JSON: anything that is not a whole number counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def reported_sha(status: Any) -> str | None:
    """The sha256 a device's status says it runs; ``None`` for anything else (a device may sign junk)."""
    cur = status.get("current") if isinstance(status, dict) else None
    sha = cur.get("sha256") if isinstance(cur, dict) else None
    return sha if isinstance(sha, str) and len(sha) == 64 and all(ch in "0123456789abcdef" for ch in sha) else None

