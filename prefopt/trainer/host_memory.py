"""Give freed host memory back to the operating system during CPU-side training (glibc only).

glibc's ``malloc`` serves requests above ``M_MMAP_THRESHOLD`` with their own ``mmap`` (returned to the system on
``free``) and smaller ones from its heap (kept by the process after ``free``). The threshold starts at 128 KiB but
*adapts*: every freed mmapped block raises it to that block's size, up to 32 MiB. A training step frees hundreds of
1-32 MiB activation and logits blocks, so after the first step they all land in the heap, and the heap keeps what
the step freed, fragmented, beside the model state: on the 128k-vocabulary benchmark model the process held
150-330 MiB more than its live tensors (docs/performance.md). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``,
which also turns the adaptation off) returns each freed block of at least that size immediately. Equivalent to
starting Python with ``MALLOC_MMAP_THRESHOLD_=1048576``; a process-wide setting, applied once, switchable with
``train.return_freed_host_memory``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD_BYTES = 1 << 20


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory_to_os(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes``; True when applied (False off glibc, or if refused)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    if applied:
        logger.debug("glibc mmap threshold fixed at %d bytes", threshold_bytes)
    return applied
