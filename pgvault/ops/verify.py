"""verify: can every backup still be restored, and how far can it recover?

Per backup: the manifest opens; every block it needs (block lists included) is in the index and
in a pack that exists; in a full run each such block is read and its envelope authenticated (the
AEAD tag, or xxh3-128 over header, block id and stored bytes: any change to what is stored fails),
and with --rehash also decompressed and re-hashed against its id (the keyed BLAKE3 of its content:
this proves what pgvault wrote, at the cost of decompressing every byte of every backup); the WAL
from its start to its stop is archived (else it cannot be restored consistently), and the WAL
from there to the end of the archive along its timeline path has no gap (else point-in-time
recovery stops at the gap); those WAL objects are authenticated like blocks (decompressed too
with --rehash). Each fault names the backup it affects.

All envelopes of one ranged read are checked by one native call without the GIL
(pgvault._accel.open_blocks), and the blocks a backup needs are located and de-duplicated as
sorted 48-byte records (refs_sort): no Python object per block, so a scale-100 backup (194k
blocks of 8 KiB) verifies in about pgBackRest's time (benchmarks/RESULTS.md).

Modes: full (read every pack the selected backups use, in ranged reads of up to 4 MiB), sample
(`--sample PERCENT`: a random share of those packs and WAL segments, as restic's read-data-subset,
for cheap daily runs), metadata (`--metadata-only`: manifests, index objects, pack sizes and the
WAL listing; no pack data is read, so blocks inside block lists are not enumerated).

The result is stored in the repository (`stanzas/<s>/verify`) for `info` and monitoring.
"""

from __future__ import annotations

import math
import struct
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pgvault import _accel
from pgvault.backends.base import ObjectNotFound
from pgvault.config import Options
from pgvault.errors import ConfigError, IntegrityError, NotFoundError, PgvaultError, WalError
from pgvault.ops.common import open_repository
from pgvault.ops.walcheck import WalArchive, parse_history
from pgvault.pg import wal
from pgvault.pipeline import envelope
from pgvault.pipeline.envelope import Kind
from pgvault.progress import Progress, progress
from pgvault.repository import layout, locks
from pgvault.repository.index import ENTRY, ID_SIZE, RECORD, decode_body
from pgvault.repository.manifest import FileEntry, Manifest
from pgvault.repository.packs import PACK_MAGIC, TAIL
from pgvault.repository.repository import Repository, StanzaInfo

# How many file names a fault lists.
EXAMPLES = 3
# Bytes of one pack checked per task (one ranged read).
RUN_BYTES = 4 * 1024 * 1024
GAP_BYTES = 64 * 1024
# open_blocks' fault for a block that lies beyond the end of a (short) ranged read.
TRUNCATED = "pack is truncated"
_SPAN = struct.Struct("<Q")


@dataclass
class BackupReport:
    stanza: str
    backup_id: str
    faults: list[str] = field(default_factory=list)
    files: int = 0
    blocks: int = 0
    wal_start: str | None = None
    wal_stop: str | None = None
    recoverable_to: str | None = None

    @property
    def ok(self) -> bool:
        return not self.faults

    def as_dict(self) -> dict[str, Any]:
        return {
            "stanza": self.stanza,
            "id": self.backup_id,
            "ok": self.ok,
            "faults": self.faults,
            "files": self.files,
            "blocks": self.blocks,
            "wal_start": self.wal_start,
            "wal_stop": self.wal_stop,
            "recoverable_to": self.recoverable_to,
        }


@dataclass
class VerifyReport:
    mode: str
    sample_percent: float | None
    rehash: bool = False  # blocks decompressed and re-hashed, not only authenticated
    backups: list[BackupReport] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # not tied to one backup
    damaged: bool = False  # a fault other than missing WAL
    packs_checked: int = 0
    packs_used: int = 0
    blocks_checked: int = 0
    wal_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    time: str = ""

    @property
    def ok(self) -> bool:
        return not self.faults and all(b.ok for b in self.backups)

    def as_dict(self, stanza: str | None = None) -> dict[str, Any]:
        backups = [b for b in self.backups if stanza is None or b.stanza == stanza]
        return {
            "time": self.time,
            "mode": self.mode,
            "sample_percent": self.sample_percent,
            "rehash": self.rehash,
            "ok": not self.faults and all(b.ok for b in backups),
            "faults": self.faults,
            "backups": [b.as_dict() for b in backups],
            "packs_checked": self.packs_checked,
            "packs_used": self.packs_used,
            "blocks_checked": self.blocks_checked,
            "wal_checked": self.wal_checked,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
        }

    def error(self) -> PgvaultError | None:
        """The error verify exits with: integrity (5) for damage, WAL (9) when only WAL is missing."""
        if self.ok:
            return None
        bad = sorted({b.backup_id for b in self.backups if not b.ok})
        count = len(self.faults) + sum(len(b.faults) for b in self.backups)
        what = f"{count} faults" + (f" affecting backups {', '.join(bad)}" if bad else "")
        if self.damaged:
            return IntegrityError(f"verify found {what}")
        return WalError(f"verify found {what}")


def verify(opts: Options) -> VerifyReport:
    if opts.metadata_only and opts.sample is not None:
        raise ConfigError("verify takes --metadata-only or --sample, not both")
    set_id = opts.set if "set" in opts.given else None
    if set_id is not None and not opts.stanza:
        raise ConfigError("verify --set needs --stanza")
    mode = "metadata" if opts.metadata_only else "sample" if opts.sample is not None and opts.sample < 100 else "full"
    repo = open_repository(opts)
    stanzas = [opts.stanza] if opts.stanza else repo.stanzas()
    infos = [repo.stanza_info(s) for s in stanzas]
    with locks.hold(repo, locks.LockRequest("verify"), opts.lock_timeout):
        report = VerifyReport(mode, opts.sample if mode == "sample" else None, rehash=opts.rehash and mode != "metadata")
        started = time.monotonic()
        Verifier(repo, report, opts.jobs, opts.progress).run(infos, set_id)
        report.seconds = time.monotonic() - started
        report.time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for info in infos:
            doc = report.as_dict(info.stanza)
            doc["set"] = set_id
            repo.put_json(Kind.REPORT, layout.verify_key(info.stanza), doc)
    return report


def last_result(repo: Repository, stanza: str) -> dict[str, Any] | None:
    """The stored result of the last verify of a stanza, or None."""
    try:
        return repo.get_json(Kind.REPORT, layout.verify_key(stanza))
    except ObjectNotFound:
        return None


class Verifier:
    def __init__(self, repo: Repository, report: VerifyReport, jobs: int, progress_mode: str) -> None:
        self.repo = repo
        self.report = report
        self.jobs = jobs
        self.progress_mode = progress_mode
        self.full = report.mode != "metadata"
        # The located blocks every selected backup needs (REF records, pgvault/_pure.py: id,
        # offset, length, pack number), sorted by pack and offset, each once. 48 bytes a block
        # and no per-block Python objects: a dict of ids cost ~150 bytes and ~1 us a block.
        self.refs = b""
        self.manifests: dict[int, Manifest] = {}
        # per backup: fault message -> bad block ids
        self.block_faults: dict[int, dict[str, list[bytes]]] = defaultdict(lambda: defaultdict(list))
        # blocks that failed a check, not yet tied to the backups that need them: message -> ids
        self.unattributed: dict[str, list[bytes]] = defaultdict(list)
        self.wal_reads: dict[tuple[str, str], int] = defaultdict(int)  # (stanza, segment) -> mask
        # Whole-repository mode (full, every backup): packs are checked from the index objects
        # while the manifests load; the backups' records only give the packs they use.
        self.whole = False
        self.used_packs: set[int] = set()  # index pack numbers

    def run(self, infos: list[StanzaInfo], set_id: str | None) -> None:
        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="pgvault-verify") as pool:
            self._run(pool, infos, set_id)

    def _run(self, pool: ThreadPoolExecutor, infos: list[StanzaInfo], set_id: str | None) -> None:
        # A full run of every backup checks the trailer and the blocks of every indexed pack
        # (the blocks no backup uses too: new backups could reference them). Those checks need
        # only the index objects, so they start now, on the other core, while this thread reads
        # the manifests and block lists (a scale-100 verify spends ~0.1 s there), and no
        # record of the backups' blocks has to be merged or sorted.
        trailers: dict[str, Future[tuple[str | None, int]]] = {}
        self.whole = self.report.mode == "full" and set_id is None
        whole: list[Any] = []
        sizes: dict[str, int] = {}

        def start(packs: dict[str, memoryview]) -> None:  # before the index is built from them
            # Packs listed after their index objects were read: a backup running meanwhile
            # writes a pack before its index object, so every indexed pack is listed.
            sizes.update((info.key.rsplit("/", 1)[1], info.size) for info in self.repo.backend.list("packs/"))
            if self.whole:
                whole.extend(self._start_whole(pool, packs, sizes, trailers))

        packs = self.repo.pack_index_bodies(on_error=self._bad_index, map_=pool.map, before_index=start)
        for info in infos:
            ids = self.repo.list_backups(info.stanza)
            if set_id is not None:
                wanted = ids[-1] if set_id == "latest" and ids else set_id
                if wanted not in ids:
                    raise NotFoundError(f"backup {set_id} not found in stanza {info.stanza}")
                ids = [wanted]
            first = len(self.report.backups)
            for backup_id in ids:
                self._load(info.stanza, backup_id)
            self._check_wal(info, range(first, len(self.report.backups)))
        if self.whole:
            self._finish_whole(packs, sizes, trailers, *whole)
        else:
            self._check_blocks(pool, packs, sizes, trailers)
        self._read_wal()
        self._attribute()
        self._summarize_block_faults()

    def _bad_index(self, key: str, exc: PgvaultError) -> None:
        self.report.damaged = True
        self.report.faults.append(f"index object {key} is unreadable ({exc}): the blocks of its pack look missing")

    # -- manifests and block references ----------------------------------------------------

    def _load(self, stanza: str, backup_id: str) -> None:
        rep = BackupReport(stanza, backup_id)
        self.report.backups.append(rep)
        number = len(self.report.backups) - 1
        try:
            manifest = self.repo.load_manifest(stanza, backup_id)
        except PgvaultError as exc:
            self.report.damaged = True
            rep.faults.append(f"manifest is unreadable: {exc}")
            return
        self.manifests[number] = manifest
        rep.wal_start, rep.wal_stop = manifest.start_wal, manifest.stop_wal
        ids: list[bytes] = []
        for entry in _entries(manifest):
            rep.files += entry.type == "f"
            ids.append(self._entry_ids(rep, entry))
        blob = b"".join(ids)
        rep.blocks += len(blob) // ID_SIZE
        refs, missing = self.repo.index.locate_many(blob)
        if missing:  # blocks the index lacks: this backup's fault, and nothing to read
            self.report.damaged = True
            lengths = memoryview(refs).cast("I")[10 :: RECORD.size // 4].tolist()
            unindexed = dict.fromkeys(blob[k * ID_SIZE : (k + 1) * ID_SIZE] for k, n in enumerate(lengths) if n == 0)
            self.block_faults[number]["blocks missing from the repository index"].extend(unindexed)
        if self.whole:  # the packs are checked whole: only which packs this backup uses counts
            words = memoryview(refs).cast("I")
            numbers = words[11 :: RECORD.size // 4].tolist()
            if missing:
                numbers = [n for n, length in zip(numbers, words[10 :: RECORD.size // 4].tolist()) if length]
            self.used_packs.update(numbers)
            return
        # Merge into the sorted unique set; records of missing blocks (pack 0, offset 0,
        # length 0) sort first and are dropped.
        merged = _accel.refs_sort(self.refs + refs if self.refs else refs)
        skip = 0
        while skip < len(merged) and merged[skip + 40 : skip + 44] == b"\0\0\0\0":
            skip += RECORD.size
        self.refs = merged[skip:]

    def _entry_ids(self, rep: BackupReport, entry: FileEntry) -> bytes:
        """The concatenated ids of every block an entry needs, its block lists included (in
        metadata mode only those named in the manifest: block lists are not read)."""
        lists = b"".join(entry.blocklist_ids())
        if not self.full:
            return b"".join(bytes.fromhex(b) for b in entry.blocks or ()) + lists
        try:
            return self.repo.file_ids(entry) + lists
        except PgvaultError as exc:
            self.report.damaged = True
            rep.faults.append(f"block list of {entry.path} is unreadable: {exc}")
            return lists

    def _fault(self, message: str, block_id: bytes) -> None:
        """A block failed a check; _attribute later finds the backups that need it."""
        self.report.damaged = True
        self.unattributed[message].append(block_id)

    def _attribute(self) -> None:
        """Tie each bad block to the backups that need it (only when something failed: this
        reads every block list again)."""
        if not self.unattributed:
            return
        bad = {block_id for ids in self.unattributed.values() for block_id in ids}
        used: set[bytes] = set()
        for number, manifest in self.manifests.items():
            needed: set[bytes] = set()
            for entry in _entries(manifest):
                needed |= bad.intersection(_split(self._ids_of(entry)))
            used |= needed
            for message, ids in self.unattributed.items():
                hits = [block_id for block_id in ids if block_id in needed]
                if hits:
                    self.block_faults[number][message].extend(hits)
        if self.whole:
            for message, ids in self.unattributed.items():
                spare = [block_id for block_id in ids if block_id not in used]
                if spare and not message.startswith("pack "):  # missing packs: _finish_whole
                    self.report.faults.append(
                        f"{message} ({len(spare)} blocks no backup uses: new backups could reference them; "
                        "'pgvault gc --max-unused=0' drops them)"
                    )

    def _ids_of(self, entry: FileEntry) -> bytes:
        """An entry's block ids as _entry_ids finds them, without recording faults again."""
        try:
            return self.repo.file_ids(entry) + b"".join(entry.blocklist_ids())
        except PgvaultError:
            return b"".join(entry.blocklist_ids())

    def _summarize_block_faults(self) -> None:
        for number, faults in sorted(self.block_faults.items()):
            rep = self.report.backups[number]
            for message, ids in faults.items():
                files = self._files_with(number, set(ids))
                where = f"; files {', '.join(files)}" if files else ""
                rep.faults.append(f"{message} ({len(ids)} blocks{where})")

    def _files_with(self, number: int, bad: set[bytes]) -> list[str]:
        """The first few files of a backup that use one of the bad blocks."""
        out: list[str] = []
        for entry in _entries(self.manifests[number]):
            if not bad.isdisjoint(_split(self._ids_of(entry))):
                out.append(entry.path)
                if len(out) == EXAMPLES:
                    break
        return out

    # -- packs -------------------------------------------------------------------------------

    def _check_blocks(
        self, pool: ThreadPoolExecutor, packs: dict[str, memoryview], sizes: dict[str, int],
        trailers: dict[str, Future[tuple[str | None, int]]],
    ) -> None:
        refs = self.refs
        index = self.repo.index
        # One span of records per pack (the records are sorted by pack number and offset).
        by_pack: dict[str, tuple[int, int]] = {}
        for start, end in _accel.refs_runs(refs, 0, len(refs) // RECORD.size, 1 << 62, 1 << 62, 1 << 62):
            pack = index.pack_name(RECORD.unpack_from(refs, start * RECORD.size)[3])
            if pack in by_pack:  # overlapping records of one pack (a damaged index): read both
                start = min(start, by_pack[pack][0])
            by_pack[pack] = (start, end)
        self.report.packs_used = len(by_pack)
        to_read = []
        for pack, (start, end) in sorted(by_pack.items()):
            if pack not in sizes:
                state = "missing"
            elif _span_end(refs, start, end) > sizes[pack]:
                state = "truncated"
            else:
                to_read.append(pack)
                continue
            for k in range(start, end):
                self._fault(f"pack {pack} is {state}", _ref_id(refs, k))
        # A pack the index lists must exist even when no selected backup uses it: the next
        # backup would reference its blocks (dedup trusts the index).
        for pack, body in sorted(packs.items()):
            if pack not in by_pack and (pack not in sizes or _entries_end(body) > sizes[pack]):
                self.report.damaged = True
                state = "missing" if pack not in sizes else "truncated"
                self.report.faults.append(
                    f"pack {pack} is {state} but the index lists its {len(body) // ENTRY.size} blocks: "
                    "new backups could reference them (run 'pgvault gc' to drop its index object if no backup needs it)"
                )
        if not self.full:
            return
        if self.report.mode == "sample" and to_read:
            assert self.report.sample_percent is not None
            count = max(1, math.ceil(len(to_read) * self.report.sample_percent / 100))
            import random  # only for --sample

            to_read = sorted(random.sample(to_read, count))
        # Tasks of at most RUN_BYTES of one pack each (one ranged read), so both workers stay
        # busy even when a backup's data sits in a handful of 32 MiB packs; plus one trailer
        # check per pack.
        tasks: list[tuple[str, tuple[int, int] | None]] = []
        for pack in to_read:
            tasks.append((pack, None))
            start, end = by_pack[pack]
            tasks.extend((pack, run) for run in _accel.refs_runs(refs, start, end - start, RUN_BYTES, GAP_BYTES, 1 << 62))
        bar = progress(self.progress_mode, "verify", sum(sizes[p] for p in to_read))
        futures = [
            trailers[pack] if run is None and pack in trailers
            else pool.submit(self._check_task, pack, run, packs.get(pack), sizes[pack], bar)
            for pack, run in tasks
        ]
        for (pack, run), future in zip(tasks, futures):
            result = future.result()
            if run is None and pack in trailers:
                fault, size = result  # type: ignore[misc]
                faults: list[tuple[bytes | None, str]] = [(None, fault)] if fault else []
            else:
                faults, size = result  # type: ignore[assignment]
            if run is None:
                self.report.packs_checked += 1
            else:
                self.report.blocks_checked += run[1] - run[0]
            self.report.bytes_read += size
            for block_id, message in faults:
                if block_id is None:
                    self.report.damaged = True
                    self.report.faults.append(message)
                else:
                    self._fault(message, block_id)
        bar.close()

    def _start_whole(
        self, pool: ThreadPoolExecutor, packs: dict[str, memoryview], sizes: dict[str, int],
        trailers: dict[str, Future[tuple[str | None, int]]],
    ) -> tuple[list[tuple[str, Future[tuple[list[tuple[tuple[int, int], Future[Any]]], str | None]]]], Progress]:
        """Queue the check of every block and the trailer of every indexed pack that exists:
        per pack one task that turns its index object into REF records in pack order and queues
        one task per ranged read, then the trailer's (the pool runs tasks in order: the reads
        of the first pack start before any trailer is checked)."""
        bar = progress(self.progress_mode, "verify", sum(sizes[p] for p in packs if p in sizes))
        plans = []
        for pack, body in sorted(packs.items()):
            if pack in sizes:
                trailers[pack] = Future()
                plans.append((pack, pool.submit(self._plan_pack, pool, pack, body, sizes[pack], bar, trailers[pack])))
        return plans, bar

    def _plan_pack(
        self, pool: ThreadPoolExecutor, pack: str, body: memoryview, size: int, bar: Progress,
        trailer: Future[tuple[str | None, int]],
    ) -> tuple[list[tuple[tuple[int, int], Future[Any]]], str | None]:
        """The queued checks of a pack's ranged reads, made from the REF records of its index
        object (none if the pack is shorter than its index says: the fault is then "truncated");
        trailer gets the result of the trailer check, queued after them."""
        try:
            refs = _accel.entries_refs(body, 0)
            count = len(refs) // RECORD.size
            runs = _accel.refs_runs(refs, 0, count, RUN_BYTES, GAP_BYTES, 1 << 62)
            if max((_span_end(refs, start, end) for start, end in runs), default=0) > size:
                return [], "truncated"
            return [(run, pool.submit(self._check_run, pack, run, bar, refs)) for run in runs], None
        finally:
            pool.submit(_settle, trailer, _trailer_fault, self.repo, pack, size, body)

    def _finish_whole(
        self, packs: dict[str, memoryview], sizes: dict[str, int], trailers: dict[str, Future[tuple[str | None, int]]],
        plans: list[tuple[str, Future[tuple[list[tuple[tuple[int, int], Future[Any]]], str | None]]]],
        bar: Progress,
    ) -> None:
        """Collect the checks _start_whole queued; a missing or truncated pack is a fault of each
        backup that needs one of its blocks, or of the repository when none does."""
        index = self.repo.index
        used = {index.pack_name(number) for number in self.used_packs}
        self.report.packs_used = len(used)
        broken: list[tuple[str, str]] = [(pack, "missing") for pack in sorted(packs) if pack not in sizes]
        for pack, plan in plans:
            runs, state = plan.result()
            if state is not None:
                broken.append((pack, state))
            for run, future in runs:
                faults, size = future.result()
                self.report.blocks_checked += run[1] - run[0]
                self.report.bytes_read += size
                for block_id, message in faults:
                    assert block_id is not None
                    self._fault(message, block_id)
            fault, size = trailers[pack].result()
            self.report.packs_checked += 1
            self.report.bytes_read += size
            if fault:
                self.report.damaged = True
                self.report.faults.append(fault)
        bar.close()
        for pack, state in sorted(broken):
            body = packs[pack]
            if pack in used:
                for pos in range(0, len(body), ENTRY.size):
                    self._fault(f"pack {pack} is {state}", bytes(body[pos : pos + ID_SIZE]))
            else:  # as _check_blocks words it
                self.report.damaged = True
                self.report.faults.append(
                    f"pack {pack} is {state} but the index lists its {len(body) // ENTRY.size} blocks: "
                    "new backups could reference them (run 'pgvault gc' to drop its index object if no backup needs it)"
                )

    def _check_task(
        self, pack: str, run: tuple[int, int] | None, indexed: memoryview | None, size: int, bar: Progress,
    ) -> tuple[list[tuple[bytes | None, str]], int]:
        if run is None:
            fault, read = _trailer_fault(self.repo, pack, size, indexed)
            return ([(None, fault)] if fault else []), read
        return self._check_run(pack, run, bar)

    def _check_run(
        self, pack: str, run: tuple[int, int], bar: Progress, refs: bytes | None = None,
    ) -> tuple[list[tuple[bytes | None, str]], int]:
        """One ranged read; authenticate (and with --rehash open and re-hash) the blocks
        backups use from it (REF records run of refs, default self.refs): one native call for
        all of them, without the GIL."""
        if refs is None:
            refs = self.refs
        first, end = run
        start = RECORD.unpack_from(refs, first * RECORD.size)[1]
        stop = _span_end(refs, first, end)
        try:
            data = self.repo.backend.get_range(layout.pack_key(pack), start, stop - start)
        except ObjectNotFound:
            return [(_ref_id(refs, k), f"pack {pack} is missing") for k in range(first, end)], 0
        rehash = self.report.rehash
        out, spans, bad = _accel.open_blocks(
            data, start, refs, first, end - first, self.repo.keys.data_key, Kind.BLOCK,
            self.repo.dictionary if rehash else None, rehash,
        )
        faults: list[tuple[bytes | None, str]] = []
        failed = set()
        for k, message in bad:
            failed.add(k)
            if message == TRUNCATED:
                faults.append((_ref_id(refs, k), f"pack {pack} is truncated"))
            else:
                faults.append((_ref_id(refs, k), f"blocks in pack {pack} fail authentication ({message})"))
        if rehash:
            assert out is not None and spans is not None
            view = memoryview(out)
            pos = 0
            for k, (span,) in zip(range(first, end), _SPAN.iter_unpack(spans)):
                if k not in failed:
                    block_id = _ref_id(refs, k)
                    if self.repo.keys.block_id(view[pos : pos + span]) != block_id:
                        faults.append((block_id, f"blocks in pack {pack} do not match their ids"))
                pos += span
        bar.add(len(data))
        return faults, len(data)

    # -- WAL ---------------------------------------------------------------------------------

    def _check_wal(self, info: StanzaInfo, numbers: range) -> None:
        names = self.repo.list_wal(info.stanza)
        histories: dict[int, list[tuple[int, int]]] = {}
        for name in names:
            if name.endswith(".history"):
                try:
                    histories[int(name[:8], 16)] = parse_history(self.repo.get_wal(info.stanza, name).decode())
                except (PgvaultError, ValueError) as exc:
                    self.report.faults.append(f"stanza {info.stanza}: timeline history {name} is unreadable ({exc})")
        archive = WalArchive(names, histories, info.wal_segment_size)
        for number in numbers:
            manifest = self.manifests.get(number)
            if manifest is None:
                continue
            rep = self.report.backups[number]
            tli, lo = wal.parse_segment_name(manifest.start_wal, info.wal_segment_size)
            _, hi = wal.parse_segment_name(manifest.stop_wal, info.wal_segment_size)
            needed = [n for n in range(lo, hi + 1) if not archive.has(tli, n)]
            if needed:
                rep.faults.append(
                    f"WAL {archive.name(tli, needed[0])} is missing ({len(needed)} of the segments from start to stop): "
                    "the backup cannot be restored to a consistent state"
                )
            path = archive.recovery_path(tli, wal.parse_lsn(manifest.start_lsn))
            gaps = [(t, n) for t, n in archive.missing(path) if not (t == tli and lo <= n <= hi)]
            if gaps:
                rep.faults.append(
                    f"WAL {archive.name(*gaps[0])} is missing ({len(gaps)} segments missing after the stop): "
                    "point-in-time recovery from this backup stops before it"
                )
            rep.recoverable_to = _reachable_end(archive, path) if not needed else None
            bit = 1 << number
            for span in path:
                for n in range(span.lo, span.hi + 1):
                    if archive.has(span.tli, n):
                        self.wal_reads[(info.stanza, archive.name(span.tli, n))] |= bit

    def _read_wal(self) -> None:
        """Authenticate the WAL segments the selected backups use (with --rehash also
        decompress them, as blocks: 16 MiB of zstd per segment is most of a verify's WAL cost)."""
        if not self.full:
            return
        wanted = sorted(self.wal_reads)
        if self.report.mode == "sample" and wanted:
            assert self.report.sample_percent is not None
            import random  # only for --sample

            wanted = sorted(random.sample(wanted, max(1, math.ceil(len(wanted) * self.report.sample_percent / 100))))

        def check(item: tuple[str, str]) -> str | None:
            try:
                if self.report.rehash:
                    self.repo.get_wal(*item)
                else:
                    self.repo.authenticate_wal(*item)
            except PgvaultError as exc:
                return f"WAL {item[1]} is unreadable ({exc})"
            return None

        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="pgvault-verify") as pool:
            for item, problem in zip(wanted, pool.map(check, wanted)):
                self.report.wal_checked += 1
                if problem is None:
                    continue
                self.report.damaged = True
                mask, number = self.wal_reads[item], 0
                while mask:
                    if mask & 1:
                        self.report.backups[number].faults.append(problem)
                    mask >>= 1
                    number += 1


def _settle(future: Future[Any], fn: Any, *args: Any) -> None:
    """Run fn(*args) into future (a task queued by another task, awaited by the main thread)."""
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # noqa: BLE001 -- handed to whoever waits on future, which re-raises it
        future.set_exception(exc)


def _entries(manifest: Manifest) -> list[FileEntry]:
    return [*manifest.files, *([manifest.server_manifest] if manifest.server_manifest else [])]


def _reachable_end(archive: WalArchive, path: list[Any]) -> str | None:
    """The last segment recovery reaches along path before the first gap."""
    last = None
    for span in path:
        for n in range(span.lo, span.hi + 1):
            if not archive.has(span.tli, n):
                return last
            last = archive.name(span.tli, n)
    return last


def _trailer_fault(repo: Repository, pack: str, size: int, indexed: memoryview | None) -> tuple[str | None, int]:
    """A pack's trailer must open and list what its index object lists (the index can be rebuilt
    from trailers only if they are right). Returns the fault, if any, and the bytes read."""
    key = layout.pack_key(pack)
    read = 0
    try:
        if size < TAIL.size:
            raise IntegrityError("too short")
        tail = repo.backend.get_range(key, size - TAIL.size, TAIL.size)
        read += len(tail)
        length, magic = TAIL.unpack(tail)
        if magic != PACK_MAGIC or length > size - TAIL.size:
            raise IntegrityError("bad tail")
        trailer = repo.backend.get_range(key, size - TAIL.size - length, length)
        read += len(trailer)
        plain = envelope.open_(repo.keys, trailer, pack.encode(), Kind.PACK_TRAILER)
        name, body = decode_body(plain)
    except ObjectNotFound:
        return None, read  # reported per block
    except (IntegrityError, struct.error) as exc:
        return f"pack {pack}: trailer is unreadable ({exc})", read
    # The writer encodes both from the same entries, so they are usually equal byte for byte:
    # one comparison of the whole opened objects, no copies (5 MiB each at scale 100).
    if name == pack and indexed is not None and plain == indexed.obj:
        return None, read
    if name != pack or (indexed is None or body != indexed) and _entry_set(body) != _entry_set(indexed):
        return f"pack {pack}: trailer does not match its index object", read
    return None, read


def _entry_set(body: memoryview | None) -> Counter[bytes]:
    if body is None:
        return Counter()
    return Counter(bytes(body[i : i + ENTRY.size]) for i in range(0, len(body), ENTRY.size))


def _ref_id(refs: bytes, k: int) -> bytes:
    return refs[k * RECORD.size : k * RECORD.size + ID_SIZE]


def _span_end(refs: bytes, start: int, end: int) -> int:
    """Where the last of REF records start..end-1 (sorted by offset) ends in its pack."""
    _, offset, length, _ = RECORD.unpack_from(refs, (end - 1) * RECORD.size)
    return int(offset + length)


def _entries_end(body: memoryview) -> int:
    """Where the furthest entry of an index object's body ends in its pack."""
    return max((offset + length for _, offset, length in ENTRY.iter_unpack(body)), default=0)


def _split(ids: bytes) -> list[bytes]:
    return [ids[i : i + ID_SIZE] for i in range(0, len(ids), ID_SIZE)]


def render_text(report: VerifyReport) -> str:
    if report.mode == "sample":
        scope = f"{report.sample_percent:g}% of packs read"
    else:
        scope = "every pack read" if report.mode == "full" else "metadata only"
    lines = [
        f"verify ({scope}): {len(report.backups)} backups, {report.packs_checked} of {report.packs_used} packs, "
        f"{report.blocks_checked} blocks, {report.wal_checked} WAL segments, "
        f"{report.bytes_read / 2**20:.1f} MiB read in {report.seconds:.1f}s"
    ]
    for b in report.backups:
        if b.ok:
            reach = f", recoverable to {b.recoverable_to}" if b.recoverable_to else ""
            lines.append(f"ok     {b.stanza}/{b.backup_id}: {b.files} files, {b.blocks} blocks, WAL {b.wal_start}..{b.wal_stop}{reach}")
        for fault in b.faults:
            lines.append(f"FAULT  {b.stanza}/{b.backup_id}: {fault}")
    for fault in report.faults:
        lines.append(f"FAULT  repository: {fault}")
    return "\n".join(lines)
