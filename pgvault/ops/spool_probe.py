"""Whether a spool worker (pusher or prefetcher) runs, using only os and fcntl.

The worker holds an flock on its lock file for as long as it runs; archive_command and
restore_command probe it on their fast paths, before the rest of pgvault is imported.
"""

from __future__ import annotations

import fcntl
import os


def worker_running(lock_path: str) -> bool:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False
