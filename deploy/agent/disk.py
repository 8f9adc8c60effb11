"""Durable writes on the device's disk, and what a refused write means.

Every file the agent keeps is written with a rename (readers see the old or the new version,
never half) and fsynced with its directory, so a power cut or a SIGKILL anywhere leaves a
complete state behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from edgeslim.deploy.agent.errors import LocalDiskError
from edgeslim.deploy.manifest import Artifact


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write-then-rename, fsynced: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_symlink(target: str | None, link: Path) -> None:
    """Point ``link`` at ``target`` (relative) atomically; ``None`` removes it."""
    if target is None:
        try:
            link.unlink()
        except FileNotFoundError:
            pass
    else:
        tmp = link.with_name(f".{link.name}.new")
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, link)
    fsync_dir(link.parent)


def read_link(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except (FileNotFoundError, OSError):
        return None


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_error(exc: OSError, state_dir: Path, art: Artifact | None, doing: str) -> LocalDiskError:
    """The one-line failure for a write the device's disk refused while ``doing``, with the free space."""
    free = free_bytes(state_dir)
    need = f"; the artifact is {art.size} bytes" if art is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (f"no space left on device: free {free} bytes in {state_dir}{need} ({doing}); "
               "free space on the device, then send a new manifest (still serving the current model)")
    else:
        msg = (f"cannot write to {state_dir} while {doing}: {exc.strerror or exc} "
               f"(errno {errno.errorcode.get(exc.errno or 0, exc.errno)}; free {free} bytes{need}); fix the "
               "device's disk, then send a new manifest (still serving the current model)")
    return LocalDiskError(msg)
