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
from typing import TYPE_CHECKING

from pgvault.config import Options
from pgvault.errors import IntegrityError, PgvaultError, WalError, WalNotFoundError
from pgvault.ops import fetch_queue, spool
from pgvault.pg import wal

if TYPE_CHECKING:
    from pgvault.repository.repository import Repository

log = logging.getLogger(__name__)

LINGER = 2.0  # seconds the prefetcher waits for the next request before it exits
POLL = 0.005  # seconds between looks at the request file (one small read)
RESCAN = 0.1  # seconds between queue scans when no request and no fetch changed anything


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


def _taken(queue: Path, placed: set[str]) -> str | None:
    """The newest queued segment that was moved out of the queue by someone else since the
    last look (recovery takes them in order, so watching the oldest one is enough)."""
    taken = None
    while placed:
        oldest = min(placed)
        if os.path.exists(queue / oldest):
            break
        placed.discard(oldest)
        taken = oldest
    return taken


CHUNK = 1 << 18  # bytes decompressed per write: stays in the CPU caches, reused for the whole segment


def write_wal(repo: Repository, stanza: str, name: str, path: Path) -> None:
    """Write one archived WAL file to path, decompressing it as a stream.

    What repo.get_wal returns is the whole file built in one fresh 16 MiB buffer (page faults
    and a pass through memory that evicts the caches) and then copied into the page cache by a
    second pass. Recovery replays on the other core of two, and replay is memory bound: it
    measurably slowed down while the prefetcher did that. Decompressing CHUNK bytes at a time
    into one reused buffer, each written out while still cached, does the same work in a
    fraction of the memory traffic (what pgBackRest's archive-get does too).
    """
    from pgvault.backends.base import ObjectNotFound
    from pgvault.pipeline import codecs, envelope
    from pgvault.repository import layout

    key = layout.wal_key(stanza, name)
    try:
        sealed = repo.backend.get(key)
    except ObjectNotFound:
        raise WalNotFoundError(f"WAL file {name} is not in the repository") from None
    codec, payload, raw_length = envelope.verified_payload(repo.keys, sealed, key.encode(), envelope.Kind.WAL)
    with open(path, "wb", buffering=0) as f:
        if codec == codecs.Codec.ZSTD:
            import zstandard

            try:
                with zstandard.ZstdDecompressor().stream_writer(f, write_size=CHUNK, closefd=False) as out:
                    out.write(payload)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"WAL file {name} failed to decompress: {exc}") from None
        else:  # other codecs have no streaming form here; WAL is zstd unless configured otherwise
            f.write(codecs.decompress(codec, payload, raw_length))
        if f.tell() != raw_length:
            raise IntegrityError(f"WAL file {name} decompressed to the wrong length")


def run_prefetcher(opts: Options, queue: Path, lock: spool.WorkerLock) -> None:
    """Keep the segments after the wanted one queued until no request came for LINGER s.

    Segments are handed to the workers one by one as slots free up (one more queued than
    there are workers), so a request is looked at every POLL seconds even while fetching.
    The directory scan runs only when something changed or every RESCAN seconds: restore_command
    waits on the answer to a request, and the scan competes with replay for the CPU.
    """
    if not lock.acquire():
        return  # another prefetcher won the race
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from pgvault.ops.common import open_repository  # in the worker only

    stanza = opts.require_stanza()
    repo = open_repository(opts)
    info = repo.stanza_info(stanza)
    depth = max(1, opts.archive_get_queue_max * (1 << 20) // info.wal_segment_size)
    absent: dict[str, float] = {}  # segment -> when it was found absent (retry later)

    def fetch(name: str, answer: bool) -> bool:
        """Queue one file; True if it was. answer: this look was taken after restore_command
        asked for name, so absence and errors are its answer (a look from before could miss a
        file archived since)."""
        tmp = queue / f".{name}.tmp"
        try:
            write_wal(repo, stanza, name, tmp)
        except WalNotFoundError:
            if answer:
                spool.write_status(queue / f"{name}.missing")
            absent[name] = time.monotonic()
            return False
        except (PgvaultError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            message = exc.message if isinstance(exc, PgvaultError) else f"cannot write {tmp}: {exc.strerror}"
            if answer:
                spool.write_status(queue / f"{name}.error", message)
            log.error("%s: %s", name, message)
            return False
        os.replace(tmp, queue / name)
        return True

    last_request = time.monotonic()
    request = seen = ("", "", "")  # the request acted on; the last one read from the want file
    in_flight: dict[str, Future[bool]] = {}
    placed: set[str] = set()  # segments this prefetcher queued and has not removed itself
    next_scan = 0.0
    with ThreadPoolExecutor(max_workers=opts.jobs, thread_name_prefix="pgvault-fetch") as pool:
        while time.monotonic() - last_request < LINGER:
            latest = fetch_queue.read_request(str(queue))
            fresh = latest != seen
            if fresh:
                request = seen = latest
            else:
                taken = _taken(queue, placed)
                current = request[0]
                if taken and (not wal.SEGMENT_RE.match(current) or taken > current):
                    # moved out by fetch_queue.shell_restore_command: recovery is there now
                    request, fresh = (taken, "got", ""), True
            if fresh:
                last_request = time.monotonic()
            finished = [n for n, f in in_flight.items() if f.done()]
            for name in finished:
                if in_flight.pop(name).result() and wal.SEGMENT_RE.match(name):
                    placed.add(name)
            wanted, state, _ = request
            if not wanted or not (fresh or finished or time.monotonic() >= next_scan):
                time.sleep(POLL)
                continue
            next_scan = time.monotonic() + RESCAN
            names = upcoming(wanted, depth, info.wal_segment_size)
            keep = set(names)
            for queued in os.listdir(queue):  # segments recovery has moved past
                if wal.SEGMENT_RE.match(queued) and queued not in keep:
                    (queue / queued).unlink(missing_ok=True)
                    placed.discard(queued)
            if fresh and state == "need" and not (queue / wanted).exists():
                if wanted in in_flight:  # started before the request: its look does not count
                    wait([in_flight.pop(wanted)])
                if not (queue / wanted).exists():
                    in_flight[wanted] = pool.submit(fetch, wanted, True)
            slots = opts.jobs + 1 - len(in_flight)
            now = time.monotonic()
            for name in names[1:]:
                if slots <= 0:
                    break
                if name in in_flight or (queue / name).exists():
                    continue
                if now - absent.get(name, -1e9) < 1.0:
                    break  # not archived yet: stop at the first gap, look again shortly
                in_flight[name] = pool.submit(fetch, name, False)
                slots -= 1
            if in_flight:
                wait(list(in_flight.values()), timeout=POLL, return_when=FIRST_COMPLETED)
            else:
                time.sleep(POLL)
    lock.release()
