"""wal-fetch --archive-async: prefetch the segments recovery will ask for next.

restore_command is called once per segment, and each call would otherwise pay a process
start plus a repository round trip. The prefetcher keeps up to --archive-get-queue-max MiB
of the following segments in the spool, fetched in parallel; restore_command for a queued
segment is a local rename.

Exit codes keep their meaning: a ``NAME.missing`` marker is only written for the very file
restore_command is waiting for, checked after it asked, so a segment archived later is never
reported absent from a stale look. Failures other than absence come back as errors
(wal-fetch exits above 125 and PostgreSQL stops recovery).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pgvault.config import Options
from pgvault.errors import PgvaultError, WalError, WalNotFoundError
from pgvault.ops import fetch_queue, spool
from pgvault.pg import wal

log = logging.getLogger(__name__)

LINGER = 2.0  # seconds the prefetcher waits for the next request before it exits


def fetch_async(opts: Options, name: str, target: Path) -> None:
    stanza = opts.require_stanza()
    queue = spool.spool_dir(opts.spool_path, stanza, "fetch")
    missing, error = queue / f"{name}.missing", queue / f"{name}.error"
    lock = spool.WorkerLock(queue / fetch_queue.LOCK)
    if fetch_queue.deliver_if_queued(str(queue), name, str(target)):
        if not lock.held_elsewhere():
            spool.spawn(lambda: run_prefetcher(opts, queue, lock), queue / "fetcher.log")
        return
    missing.unlink(missing_ok=True)  # only a look taken after this request counts
    error.unlink(missing_ok=True)
    fetch_queue.announce(str(queue), name, "need")
    deadline = spool.deadline_after(opts.archive_timeout)
    while True:
        if fetch_queue.deliver_if_queued(str(queue), name, str(target)):
            return
        if missing.exists():
            missing.unlink()
            raise WalNotFoundError(f"WAL file {name} is not in the repository")
        if error.exists():
            message = error.read_text().strip()
            error.unlink()
            raise WalError(f"fetching {name} failed: {message}")
        if not lock.held_elsewhere():
            spool.spawn(lambda: run_prefetcher(opts, queue, lock), queue / "fetcher.log")
        if time.monotonic() > deadline:
            raise WalError(f"{name} was not fetched within {opts.archive_timeout}s (see {queue / 'fetcher.log'})")
        time.sleep(spool.POLL)


def upcoming(name: str, count: int, seg_size: int) -> list[str]:
    """name and the segments after it on its timeline (just name for other WAL files)."""
    if not wal.SEGMENT_RE.match(name):
        return [name]
    tli, segno = wal.parse_segment_name(name, seg_size)
    return [wal.segment_name(tli, segno + i, seg_size) for i in range(count)]


def run_prefetcher(opts: Options, queue: Path, lock: spool.WorkerLock) -> None:
    """Keep the segments after the wanted one queued until no request came for LINGER s."""
    if not lock.acquire():
        return
    from concurrent.futures import ThreadPoolExecutor

    from pgvault.ops.common import open_repository  # in the worker only
    stanza = opts.require_stanza()
    repo = open_repository(opts)
    info = repo.stanza_info(stanza)
    depth = max(1, opts.archive_get_queue_max * (1 << 20) // info.wal_segment_size)
    absent: dict[str, float] = {}  # segment -> when it was found absent (retry later)

    def fetch(name: str, wanted: str) -> None:
        try:
            data = repo.get_wal(stanza, name)
        except WalNotFoundError:
            if name == wanted:
                spool.write_status(queue / f"{name}.missing")
            absent[name] = time.monotonic()
            return
        except PgvaultError as exc:
            if name == wanted:
                spool.write_status(queue / f"{name}.error", exc.message)
            log.error("%s: %s", name, exc.message)
            return
        tmp = queue / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, queue / name)

    last_request = time.monotonic()
    request = ("", "", "")
    with ThreadPoolExecutor(max_workers=opts.jobs, thread_name_prefix="pgvault-fetch") as pool:
        while time.monotonic() - last_request < LINGER:
            latest = fetch_queue.read_request(str(queue))
            fresh = latest != request
            if fresh:
                request, last_request = latest, time.monotonic()
            wanted, state, _ = request
            if not wanted:
                time.sleep(0.02)
                continue
            names = upcoming(wanted, depth, info.wal_segment_size)
            keep = set(names)
            for queued in queue.iterdir():  # segments recovery has moved past
                if wal.SEGMENT_RE.match(queued.name) and queued.name not in keep:
                    queued.unlink(missing_ok=True)
            if fresh and state == "need" and not (queue / wanted).exists():
                fetch(wanted, wanted)  # answers this request: the file, .missing or .error
            todo = []
            for n in names[1:]:
                if (queue / n).exists():
                    continue
                if time.monotonic() - absent.get(n, -1e9) < 1.0:
                    break  # not archived yet: stop at the first gap, look again shortly
                todo.append(n)
            if todo:
                list(pool.map(lambda n: fetch(n, wanted), todo[: opts.jobs * 4]))
            else:
                time.sleep(0.02)
    lock.release()
