"""glibc malloc settings for backups (long, multi-threaded, many large short-lived buffers).

Measured on first fulls of pgbench (PG 15, --jobs 2): with glibc's defaults the peak RSS was
100-107 MB at scale 100 and 142-159 MB at scale 300, while the index and every buffer the
backup holds account for ~25 MB more at scale 300 than at 100. The rest was the allocator:
glibc raises its mmap threshold each time a large block (a 4 MiB block list, a 1 MiB pack
buffer, an index table) is freed, so later large blocks come from the heaps of the worker
threads (one arena per thread) and their freed pages stay mapped. A fixed 1 MiB threshold
(large blocks always mmapped, returned at free): 93 MB at scale 100; with the 32-byte index
records too, 92 MB at scale 100 and 108 MB at 300, for about the same CPU time (+0.1 s of
6.2 s in an A/B). Limiting arenas to two as well saved ~2 MB more but made restores ~1 s
slower. Restores do not use this: their 8 MiB ranged reads, mmapped afresh each time, cost
~1 s more CPU in page faults (scale 100).

The threshold is 4 MiB, not 1 MiB: once the native write path had cut the first full's CPU,
1 MiB cost 0.25-0.3 s of it (the pack writer's 1 MiB buffer and other buffers just over 1 MiB
mmapped and unmapped again and again). First fulls at scale 100, alternating, two each: no
setting 3.95-4.03 s wall / 4.81 s CPU / 100-101 MB; 1 MiB 4.26-4.32 s / 5.05-5.12 s / 92 MB;
4 MiB 4.05-4.08 s / 4.89-4.92 s / 92-93 MB (block lists and index tables, 4 MiB, still go).

Only glibc has mallopt; elsewhere this does nothing. ctypes is imported here, never on the
wal-push path.
"""

from __future__ import annotations

import logging

log = logging.getLogger("pgvault.malloc")

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20


def bound_heap() -> None:
    """Apply the setting above; call before the worker threads start."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        log.debug("mallopt refused the mmap threshold")
