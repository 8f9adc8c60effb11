"""Finding 8: ``edgeslim fleet keygen --overwrite`` onto a 0644 key file left the new private key 0644
(``os.open`` with ``O_CREAT`` keeps an existing file's mode).

The key is now written to a new 0600 file in the same directory and renamed over the old one.
"""

from __future__ import annotations

import stat

from tests.conftest import run_cli
from edgeslim.deploy import signing


def test_keygen_overwrite_leaves_the_private_key_0600(tmp_path):
    d = tmp_path / "keys"
    priv, pub = signing.generate_keypair(d)
    old_pem = priv.read_bytes()
    priv.chmod(0o644)  # e.g. copied around with a permissive umask, or chmod'ed by a backup tool
    proc = run_cli("fleet", "keygen", str(d), "--overwrite", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600, oct(priv.stat().st_mode)
    assert priv.read_bytes() != old_pem  # a new key, in place
    key = signing.load_private_key(priv)
    assert signing.key_id(key.public_key()) in signing.load_public_keys(pub)
    assert sorted(p.name for p in d.iterdir()) == sorted([priv.name, pub.name])  # no temp file left
