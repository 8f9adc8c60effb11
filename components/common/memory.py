"""How a process hands memory back: large buffers returned to the system as soon as they are freed.

glibc's malloc serves an allocation of at least its mmap threshold (128 KiB to start) with a mapping of its
own, which goes back to the system when freed. As large buffers are freed it raises that threshold, up to
32 MiB, and larger buffers then come from the heap, where freed space stays resident while anything above it
lives. A task that allocates and frees a batch's arrays over and over from several threads (models'
outputs, the next batch decoded beside them) then peaks wherever the heap happened to fragment: the
detector's evaluate task peaked up to 30 MB apart on the same split. A fixed threshold keeps every buffer
of a megabyte or more in a mapping of its own, so the peak follows what is alive.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_BUFFER = 1 << 20


def return_large_buffers(threshold: int = LARGE_BUFFER) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, unmapped when freed, for
    the rest of this process (glibc's ``mallopt(M_MMAP_THRESHOLD)``; it also stops glibc from raising the
    threshold). Costs a page fault per page of each such buffer on each use: a few percent of an
    evaluation. Returns whether the allocator took it (False off glibc, where this does nothing)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
