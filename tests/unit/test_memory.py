"""A process that asks for it hands a freed large buffer back to the system at once, wherever it lay."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A 16 MiB buffer freed raises glibc's mmap threshold to 16 MiB; an 8 MiB buffer then comes from the heap and,
# with small allocations made above it, stays resident after it is freed, unless the threshold is fixed.
_PROGRAM = textwrap.dedent("""
    import sys
    import numpy as np
    from edgeslim.components.common.memory import return_large_buffers

    def rss_mib():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

    if sys.argv[1] == "fixed":
        assert return_large_buffers()
    big = np.ones(16 << 20, np.uint8)
    del big
    base = rss_mib()
    buffer = np.ones(8 << 20, np.uint8)
    above = [np.ones(4096, np.uint8) for _ in range(4)]
    del buffer
    print(rss_mib() - base)
""")


def _kept_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_a_freed_large_buffer_leaves_resident_memory_only_with_the_threshold_fixed():
    if _kept_mib("default") < 4:
        pytest.skip("this C library returns the buffer by itself (not glibc's dynamic mmap threshold)")
    assert _kept_mib("fixed") < 1  # the 8 MiB went back to the system as it was freed
