"""wal-push --archive-async: a background pusher keeps ahead of archive_command.

PostgreSQL archives one file per archive_command call and waits for each. The pusher
instead takes every file PostgreSQL has marked ready (pg_wal/archive_status/*.ready),
compresses, encrypts and stores them in parallel, and leaves ``NAME.ok`` in the spool once
each is durable in the repository. archive_command for a file then only has to find its
``.ok``: success is never reported before the file is safely stored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pgvault.config import Options
from pgvault.errors import PgvaultError, WalError
from pgvault.ops import spool
from pgvault.ops.wal import push_file

log = logging.getLogger(__name__)

LINGER = 2.0  # seconds the pusher waits for new .ready files before it exits


def push_async(opts: Options, path: Path) -> None:
    stanza = opts.require_stanza()
    out = spool.spool_dir(opts.spool_path, stanza, "push")
    ok, error = out / f"{path.name}.ok", out / f"{path.name}.error"
    lock = spool.WorkerLock(out / "pusher.lock")
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
    """Ready files without a status yet; drops .ok files of files PostgreSQL has marked done."""
    ready = sorted(p.name[: -len(".ready")] for p in (wal_dir / "archive_status").glob("*.ready"))
    ready_set = set(ready)
    for ok in out.glob("*.ok"):
        if ok.name[: -len(".ok")] not in ready_set:
            ok.unlink(missing_ok=True)
    return [n for n in ready if not (out / f"{n}.ok").exists() and not (out / f"{n}.error").exists()]


def run_pusher(opts: Options, wal_dir: Path, out: Path, lock: spool.WorkerLock) -> None:
    """Push every ready file until none has appeared for LINGER seconds."""
    if not lock.acquire():
        return
    from concurrent.futures import ThreadPoolExecutor

    from pgvault.ops.common import open_repository  # in the worker only  # another pusher won the race
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
    with ThreadPoolExecutor(max_workers=opts.jobs, thread_name_prefix="pgvault-push") as pool:
        while True:
            pending = _pending(wal_dir, out)
            if not pending:
                if time.monotonic() - idle_since > LINGER:
                    break
                time.sleep(0.05)
                continue
            list(pool.map(push, pending[: opts.jobs * 8]))
            idle_since = time.monotonic()
    lock.release()
