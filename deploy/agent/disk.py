"""Durable writes on the device's disk, what a refused write means, and never following a planted link.

Every file the agent keeps is written with a rename (readers see the old or the new version,
never half) and fsynced with its directory, so a power cut or a SIGKILL anywhere leaves a
complete state behind.

Whoever else can write into the state directory must not bend the agent through it: every
file the agent reads or appends to is opened with ``O_NOFOLLOW`` and refused unless it is a
regular file owned by the agent's own user (:func:`open_own`); a temporary path is removed
(never followed) before it is created with ``O_EXCL``; and whatever is removed is removed as
it stands, a link as a link (:func:`remove_path`), never the files it points at.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from edgeslim.deploy.agent.errors import LocalDiskError, UnsafePath
from edgeslim.deploy.manifest import Artifact

_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def check_owned(path: Path, st: os.stat_result, *, kind: str = "file") -> None:
    """Refuse what is not a ``kind`` (``file`` or ``dir``) owned by this process's user."""
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symbolic link to {read_link(path) or '?'}, not a {kind} the agent made")
    ok = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not ok:
        raise UnsafePath(f"{path} is not a regular {kind}")
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{path} belongs to uid {st.st_uid}, not to the agent's user (uid {os.geteuid()})")


def open_own(path: Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """``os.open`` that never follows a link at ``path`` and refuses a file the agent's user does not own.

    Raises FileNotFoundError when nothing is there (and ``flags`` do not create), UnsafePath for a
    link, a non-regular file or a foreign owner.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link to {read_link(path) or '?'}, not a file the agent "
                             "made") from None
        raise
    try:
        check_owned(path, os.fstat(fd))
    except UnsafePath:
        os.close(fd)
        raise
    return fd


def read_own(path: Path) -> bytes:
    """The bytes of a file the agent wrote (through :func:`open_own`)."""
    with os.fdopen(open_own(path), "rb") as fh:
        return fh.read()


def sha256_fd(fd: int) -> str:
    """sha256 of an open file, read from its start (the bytes that are there, not what a name says)."""
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def own_sha256(path: Path) -> str:
    """sha256 of a file the agent owns, opened without following a link."""
    fd = open_own(path)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> bool:
    """Remove whatever is at ``path`` as it stands: a link (never what it points at), a file, or a
    directory tree (its links removed as links). Returns whether something was there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # fd-based on Linux: never descends through a link
    else:
        os.unlink(path)
    return True


def ensure_dir(path: Path) -> str | None:
    """Make ``path`` a directory of the agent's own; a link or file planted there is removed first.

    Returns one line saying what was removed (None when nothing was). Raises UnsafePath for a
    directory that belongs to another user (the agent does not take over another user's files).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        return None
    if stat.S_ISDIR(st.st_mode):
        try:
            check_owned(path, st, kind="dir")
        except UnsafePath as exc:
            raise UnsafePath(f"refused the state directory: {exc}; give it to the agent's user (chown) or "
                             "remove it, and let only that user write the state directory") from None
        return None
    what = f"a symbolic link to {read_link(path)}" if stat.S_ISLNK(st.st_mode) else "not a directory"
    remove_path(path)
    path.mkdir(parents=True, exist_ok=True)
    return f"{path} was {what}: removed it (never followed) and made the directory"


def create_exclusive(path: Path, mode: int = 0o644) -> int:
    """A new file at ``path`` (whatever was there removed as it stands), opened for writing; the
    agent's own, never a file a planted link points at."""
    for _ in range(3):
        remove_path(path)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
        except FileExistsError:  # planted again between the two calls: remove it again
            continue
    raise UnsafePath(f"{path} keeps being re-created by someone else: refused to write it")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write-then-rename, fsynced: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with os.fdopen(create_exclusive(tmp), "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_symlink(target: str | None, link: Path) -> None:
    """Point ``link`` at ``target`` (relative) atomically; ``None`` removes it.

    Whatever sits at the temporary ``.<link>.new`` (a stale link, a planted directory) is removed
    first, and so is a directory planted at ``link`` itself: rename(2) cannot replace one."""
    if target is None:
        remove_path(link)
    else:
        tmp = link.with_name(f".{link.name}.new")
        remove_path(tmp)
        if os.path.isdir(link) and not os.path.islink(link):
            remove_path(link)
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
