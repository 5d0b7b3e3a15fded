"""The prefetch queue's protocol between restore_command and the prefetcher, using only os.

``want`` holds ``NAME STATE TOKEN``: STATE ``need`` when restore_command waits for NAME (the
prefetcher fetches it, or answers NAME.missing / NAME.error), ``got`` when NAME was just
taken from the queue (the prefetcher keeps the files after it queued). TOKEN makes every
request new, even for the same name.
"""

from __future__ import annotations

import os
import time

from pgvault.ops.spool_probe import worker_running

LOCK = "fetcher.lock"


def announce(queue: str, name: str, state: str) -> None:
    tmp = os.path.join(queue, ".want.tmp")
    with open(tmp, "w") as f:
        f.write(f"{name} {state} {os.getpid()}.{time.time_ns()}")
    os.replace(tmp, os.path.join(queue, "want"))


def read_request(queue: str) -> tuple[str, str, str]:
    """(name, state, token) of the latest request, or empty strings."""
    try:
        with open(os.path.join(queue, "want")) as f:
            parts = f.read().split()
    except FileNotFoundError:
        return "", "", ""
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else ("", "", "")


def shell_restore_command(queue: str, command: str) -> str:
    """A restore_command that hands a queued file over with the shell alone, and runs command
    (pgvault wal-fetch) for anything else.

    Starting Python costs 10-15 ms per WAL file here, a test and one mv about 2 ms; recovery
    waits for every call. Any queued file is a complete, verified copy (written under a
    temporary name, then renamed), so handing it over needs no check that the prefetcher still
    runs: it notices the file is gone and moves its window on, and the next file not queued goes
    through command, which starts a prefetcher if none runs.
    """
    from shlex import quote

    q = quote(queue)
    return f"if [ -f {q}/%f ] && mv -f {q}/%f %p 2>/dev/null; then exit 0; fi; {command}"


def clear(queue: str) -> None:
    """Empty the queue before a restore hands it to a new recovery.

    shell_restore_command hands over any file it finds queued without asking which recovery
    queued it, so what an earlier recovery left here (from a stanza since recreated, say) must
    go: PostgreSQL, given a segment of another system, ends recovery there and promotes.
    The prefetcher's lock stays; a prefetcher still lingering re-queues from the repository.
    """
    try:
        names = os.listdir(queue)
    except FileNotFoundError:
        return
    for name in names:
        if name != LOCK:
            try:
                os.unlink(os.path.join(queue, name))
            except FileNotFoundError:
                pass


def prefetcher_running(queue: str) -> bool:
    return worker_running(os.path.join(queue, LOCK))


def deliver_if_queued(queue: str, name: str, dest: str, fast: bool = False) -> bool:
    """Move a queued file to dest (via a temporary name) and tell the prefetcher.

    fast: only when the prefetcher is running, so the queue keeps being refilled; the slow
    path delivers either way and starts a prefetcher itself.
    """
    queued = os.path.join(queue, name)
    if not os.path.exists(queued) or (fast and not prefetcher_running(queue)):
        return False
    tmp = os.path.join(os.path.dirname(dest) or ".", f".{os.path.basename(dest)}.pgvault.tmp")
    try:
        os.replace(queued, tmp)
    except OSError:  # the spool is on another filesystem
        import shutil  # only here: it costs restore_command ~5 ms to import

        shutil.copyfile(queued, tmp)
        os.unlink(queued)
    os.replace(tmp, dest)
    announce(queue, name, "got")
    return True


def fetch_fast(queue: str, name: str, dest: str, timeout: float = 60.0) -> int | None:
    """restore_command's fast path while a prefetcher runs: 0 delivered, 1 absent, None when
    the full path must decide (no prefetcher, an error, or no answer in time)."""
    if deliver_if_queued(queue, name, dest, fast=True):
        return 0
    if not prefetcher_running(queue):
        return None
    missing, error = os.path.join(queue, f"{name}.missing"), os.path.join(queue, f"{name}.error")
    for stale in (missing, error):  # only a look taken after this request counts
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    announce(queue, name, "need")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if deliver_if_queued(queue, name, dest):
            return 0
        if os.path.exists(missing):
            os.unlink(missing)
            return 1
        if os.path.exists(error) or not prefetcher_running(queue):
            return None
        time.sleep(0.005)
    return None
