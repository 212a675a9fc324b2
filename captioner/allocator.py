"""glibc ``malloc`` settings for CPU work: keep freed memory for the next step.

On the CPU, PyTorch allocates tensor memory with ``malloc``. glibc serves large blocks with
``mmap`` and hands them back with ``munmap`` when freed, and trims the top of the heap once
more than 128 KiB there is free. A training step allocates and frees gigabytes of activations,
so with the defaults every step page-faults all of it back in: measured on a 2-core VM with
ResNet-101 at 256 px, about 2 million page faults and 4-5 s of system time per step, 1.8-2.4x slower
than with :func:`keep_freed_memory` (docs/performance.md). This is the same effect that
jemalloc/tcmalloc, or ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, are used for on
CPU servers; here it is two ``mallopt`` calls at run time, no preload needed.

The cost: the process keeps the memory of its largest step mapped (its steady state during
training anyway) instead of handing it back between steps.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks of 1 GiB and more still get their own mapping
_applied = False


def keep_freed_memory() -> bool:
    """Serve allocations below 1 GiB from the heap and never trim it (glibc only).

    Affects this process and the processes it forks afterwards (DataLoader workers).
    Idempotent.

    Returns:
        True if the settings are in effect; False on a non-glibc C library (macOS, musl),
        where nothing is changed.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_TRIM_THRESHOLD = -1 disables trimming (mallopt(3)).
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.warning("could not set glibc malloc options; CPU steps may page-fault their "
                    "activations back in every time (see captioner/allocator.py)")
        return False
    _applied = True
    return True
