"""Returning freed memory to the operating system, so a closed session's cache leaves the server's RSS.

glibc keeps large freed blocks in its heap once its mmap threshold has grown (it grows with every
large free), so a server's resident memory after a big prefill stayed 1 GB above its idle size even
after the session closed (issue 15). ``malloc_trim(0)`` hands the free heap pages back.

Loading has the same problem: every tensor read and freed on the way (a dequantised GGUF tensor, a
float weight before int8 quantisation) raises the threshold, and the next ones land in a heap that
never shrinks (an int8 server of 10 SmolLM2 blocks kept 64 MB of such garbage). :func:`pin_mmap_threshold`
fixes the threshold before loading, so large temporaries are mapped and unmapped on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns the dynamic threshold off
MMAP_THRESHOLD_BYTES = 1 << 20  # a decode step's tensors stay on the heap; a weight matrix does not

logger = logging.getLogger(__name__)


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Trim the C heap (glibc only); False where there is no ``malloc_trim`` (other C libraries return memory themselves)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def pin_mmap_threshold(size: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Allocations of ``size`` bytes or more get their own mapping, returned to the system when freed
    (glibc only; False elsewhere)."""
    libc = _libc()
    return libc is not None and hasattr(libc, "mallopt") and bool(libc.mallopt(M_MMAP_THRESHOLD, size))
