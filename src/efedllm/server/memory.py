"""Returning freed memory to the operating system, so a closed session's cache leaves the server's RSS.

glibc keeps large freed blocks in its heap once its mmap threshold has grown (it grows with every
large free), so a server's resident memory after a big prefill stayed 1 GB above its idle size even
after the session closed (issue 15). ``malloc_trim(0)`` hands the free heap pages back.

Loading has the same problem: every tensor read and freed on the way (a dequantised GGUF tensor, a
float weight before int8 quantisation) raises the threshold, and the next ones land in a heap that
never shrinks (an int8 server of 10 SmolLM2 blocks kept 64 MB of such garbage). :func:`pin_mmap_threshold`
fixes the threshold before loading, so large temporaries are mapped and unmapped on their own.

Serving is the opposite case: with a 1 MB threshold every activation of a long step (a training request's
[4, 128, 1536] MLP input is 3 MB) got a fresh mapping, faulted in and zeroed page by page, and a training
forward and backward through 10 blocks took 0.30 and 0.40 s instead of the 0.23 and 0.25 s of the same
code in a process with glibc's defaults. :func:`loading_heap` pins the threshold for a load only and then
raises it to glibc's largest, :data:`SERVING_MMAP_THRESHOLD_BYTES`: a step's temporaries are reused from
the heap, and a closed large session's memory still goes back by ``release_freed_memory``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns the dynamic threshold off
MMAP_THRESHOLD_BYTES = 1 << 20  # while loading: a decode step's tensors stay on the heap; a weight matrix does not
SERVING_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)

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


@contextlib.contextmanager
def loading_heap():
    """Loads inside this map their large temporaries on their own; afterwards the threshold is raised for serving
    and what loading freed is trimmed."""
    pin_mmap_threshold()
    try:
        yield
    finally:
        pin_mmap_threshold(SERVING_MMAP_THRESHOLD_BYTES)
        release_freed_memory()
