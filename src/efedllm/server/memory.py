"""Returning freed memory to the operating system, so a closed session's cache leaves the server's RSS.

glibc keeps large freed blocks in its heap once its mmap threshold has grown (it grows with every
large free), so a server's resident memory after a big prefill stayed 1 GB above its idle size even
after the session closed (issue 15). ``malloc_trim(0)`` hands the free heap pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

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
