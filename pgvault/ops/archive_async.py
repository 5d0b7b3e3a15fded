"""wal-push --archive-async: a background pusher keeps ahead of archive_command.

PostgreSQL archives one file per archive_command call and waits for each. The pusher
instead takes every file PostgreSQL has marked ready (pg_wal/archive_status/*.ready),
compresses, encrypts and stores them in parallel, and leaves ``NAME.ok`` in the spool once
each is durable in the repository. archive_command for a file then only has to find its
``.ok``: success is never reported before the file is safely stored.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pgvault.config import Options
from pgvault.errors import PgvaultError, WalError
from pgvault.ops import push_queue, spool
from pgvault.ops.wal import push_file

log = logging.getLogger(__name__)

LINGER = 2.0  # seconds the pusher waits for new .ready files before it exits
POLL = 0.01  # seconds between looks at archive_status while idle (a listdir: cheap)


def push_async(opts: Options, path: Path) -> None:
    stanza = opts.require_stanza()
    out = spool.spool_dir(opts.spool_path, stanza, "push")
    ok, error = out / f"{path.name}.ok", out / f"{path.name}.error"
    lock = spool.WorkerLock(out / push_queue.LOCK)
    deadline = spool.deadline_after(opts.archive_timeout)
    while True:
        if ok.exists():  # the pusher removes it once PostgreSQL has marked the file done
            return
        if error.exists():
            message = error.read_text().strip()
            error.unlink()  # the next call retries
            raise WalError(f"asynchronous push of {path.name} failed: {message}")
        if not lock.held_elsewhere():
            spool.spawn(lambda: run_pusher(opts, path.parent, out, lock), out / "pusher.log")
        if time.monotonic() > deadline:
            raise WalError(f"{path.name} was not archived within {opts.archive_timeout}s (see {out / 'pusher.log'})")
        time.sleep(spool.POLL)


def _pending(wal_dir: Path, out: Path) -> list[str]:
    """Ready files without a status yet, oldest first; drops the .ok files of files PostgreSQL
    has marked done. One listing of each directory (this runs every POLL seconds)."""
    ready = sorted(n[: -len(".ready")] for n in os.listdir(wal_dir / "archive_status") if n.endswith(".ready"))
    ready_set = set(ready)
    settled = set()
    for entry in os.listdir(out):
        base, _, status = entry.rpartition(".")
        if status == "ok" and base not in ready_set:
            (out / entry).unlink(missing_ok=True)
        elif status in ("ok", "error"):
            settled.add(base)
    return [n for n in ready if n not in settled]


def run_pusher(opts: Options, wal_dir: Path, out: Path, lock: spool.WorkerLock) -> None:
    """Push every ready file until none has appeared for LINGER seconds.

    Files are handed to the workers oldest first as soon as they are ready, keeping one more
    queued than there are workers, so archive_command (which asks for them in order) finds
    its .ok as early as possible and no worker waits for a whole batch to finish.
    """
    if not lock.acquire():
        return  # another pusher won the race
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from pgvault.ops.common import open_repository  # in the worker only

    repo = open_repository(opts)
    info = repo.stanza_info(opts.require_stanza())

    def push(name: str) -> None:
        try:
            push_file(opts, repo, info, wal_dir / name)
        except PgvaultError as exc:
            spool.write_status(out / f"{name}.error", exc.message)
            log.error("%s: %s", name, exc.message)
        except Exception as exc:  # reported to archive_command, never swallowed
            spool.write_status(out / f"{name}.error", f"{type(exc).__name__}: {exc}")
            log.exception("%s", name)
        else:
            spool.write_status(out / f"{name}.ok")

    idle_since = time.monotonic()
    in_flight: dict[str, Future[None]] = {}
    with ThreadPoolExecutor(max_workers=opts.jobs, thread_name_prefix="pgvault-push") as pool:
        while True:
            for name in [n for n, f in in_flight.items() if f.done()]:
                del in_flight[name]
            pending = [n for n in _pending(wal_dir, out) if n not in in_flight]
            for name in pending[: opts.jobs + 1 - len(in_flight)]:
                in_flight[name] = pool.submit(push, name)
            if in_flight:
                idle_since = time.monotonic()
                wait(list(in_flight.values()), timeout=POLL, return_when=FIRST_COMPLETED)
            elif time.monotonic() - idle_since > LINGER:
                break
            else:
                time.sleep(POLL)
    lock.release()
