"""Turns streamed file contents into stored blocks and FileEntry block lists.

Files are cut into fixed, aligned blocks of the repository's block size (files smaller than
a block go whole). Each block is hashed, and only blocks the repository lacks are compressed,
sealed and appended to a pack, in the worker pool.

Compression dictionaries (docs/FORMAT.md §4a): a block is compressed with the repository's
newest dictionary of its page class (pages with special space, i.e. index pages, or all
others). For a class without one, the backup samples every SAMPLE_EVERY-th new block; once it
holds EARLY_SAMPLE_BYTES it trains a first dictionary, stores it, and compresses the rest of its
blocks of that class with it. The first blocks of a stream (catalogs, free space maps) are not
like the rest, so the backup keeps a uniform random sample of all its new blocks and, at the
end, trains the dictionary that later backups use from that.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable

import zstandard

from pgvault import _accel
from pgvault.pg.relfile import PAGE_SIZE, page_lsn
from pgvault.pipeline import codecs, envelope
from pgvault.pipeline.pool import OrderedPool
from pgvault.repository.manifest import INLINE_BLOCKS, FileEntry, Manifest
from pgvault.repository.packs import PackWriter
from pgvault.repository.repository import Repository, encode_delta

log = logging.getLogger("pgvault.blockstore")


# Bytes per pool task (32 blocks of 8 KiB): enough to amortise the task round trip (~20 us)
# and the GIL hand-offs (see BlockStore._seal_chunk), small enough to keep both workers busy.
# A multiple of every block size.
CHUNK_BYTES = 256 * 1024

# Dictionary training (docs/FORMAT.md §4a): 8 MiB of samples (per page class) taken from every
# 8th new block; a 32 KiB dictionary compressed 8 KiB pgbench blocks as well as one of 112 KiB.
SAMPLE_BYTES = 8 << 20
# The first dictionary of a class is trained from 4 MiB of samples, so that it is ready after
# 32 MiB of new blocks of that class. First full of pgbench scale 100, MiB stored for the primary
# key index / the accounts table: 8 MiB early sample 40.9 / 43.3; 4 MiB 35.3 / 42.1; 2 MiB
# 33.8 / 44.2; 1 MiB 33.5 / 47.2.
EARLY_SAMPLE_BYTES = 4 << 20
SAMPLE_EVERY = 8
MIN_SAMPLES = 64
DICT_SIZE = 32 * 1024
# Fixed fastcover parameters instead of zstd's search over them: on 1024 pgbench blocks the same
# ratio (19.3x), in 0.08 s instead of 0.45 s and with 9 MB instead of 19 MB of peak memory.
TRAIN_PARAMS = {"k": 1024, "d": 8, "f": 16, "steps": 1}
# Dictionary classes (page_class): "" for everything but pages with special space, "s" for those.
SPECIAL_CLASS = "s"
PAGE_CLASSES = ("", SPECIAL_CLASS)
_PAGE_BOUNDS = struct.Struct("<HHH")  # pd_lower, pd_upper, pd_special at offset 12
# A block list is stored as a delta of its base when the delta is under this share of it.
DELTA_MAX_SHARE = 0.25


@dataclass(frozen=True)
class BlockResult:
    block_id: bytes
    sealed: bytes | None  # None: the repository already has the block
    checksum_failures: list[int]


@dataclass(frozen=True)
class ChunkResult:
    ids: bytes  # 32 bytes a block
    count: int  # blocks
    new: list[int]  # the blocks the repository lacked (indices), sealed in out
    out: bytes  # their sealed objects one after another (_accel.seal_blocks)
    ends: bytes  # u64 end of each one's object in out
    checksum_failures: list[int]


@dataclass(frozen=True)
class PageCheck:
    """Verify PostgreSQL page checksums in a block; pages at or after start_lsn are skipped,
    as they may be torn by concurrent writes and WAL replay rewrites them anyway."""

    first_block: int
    start_lsn: int


@dataclass(frozen=True)
class PageMerge:
    """A block rebuilt from the parent backup's block and changed pages (PG17 incrementals):
    the first `keep` bytes of the parent block (if any), zeros up to `length`, then each
    (offset, page) laid over it."""

    parent_id: bytes | None
    keep: int
    length: int
    pages: tuple[tuple[int, bytes], ...]


class BlockStore:
    """One per backup: owns the pack writer and the pool; counts what it stored."""

    def __init__(self, repo: Repository, pool: OrderedPool[Any], codec: codecs.Codec, level: int | None) -> None:
        self.repo = repo
        self.keys = repo.keys
        self.block_size = repo.settings.block_size
        self.pool = pool
        self.codec = codec
        self.level = level
        self._level = codecs.DEFAULT_LEVELS[codec] if level is None else level
        self.packs = PackWriter(repo.backend, repo.keys, repo.index, repo.settings.pack_size, background=True)
        self.blocks_total = 0
        self.blocks_new = 0
        # One dictionary per page class (docs/FORMAT.md §4a); classes without one are sampled.
        self.zdicts: dict[str, zstandard.ZstdCompressionDict | None] = {
            cls: repo.current_dictionary(cls) if codec == codecs.Codec.ZSTD else None for cls in PAGE_CLASSES
        }
        self._samplers = {
            cls: _Sampler(SAMPLE_BYTES // self.block_size, EARLY_SAMPLE_BYTES // self.block_size)
            for cls, zdict in self.zdicts.items()
            if codec == codecs.Codec.ZSTD and zdict is None
        }
        self._sampling = bool(self._samplers)
        self._sample_lock = threading.Lock()
        # (tablespace, path) -> the previous backup's entry: its block list is the base of a delta.
        self._bases: dict[tuple[int | None, str], FileEntry] = {}

    def use_blocklist_bases(self, previous: Manifest | None) -> None:
        """Store block lists of changed files as deltas of the previous backup's (incr only)."""
        if previous is not None and previous.block_size == self.block_size:
            self._bases = {(f.tablespace, f.path): f for f in previous.files if f.blocklist is not None}

    def _sample(self, data: bytes | memoryview, cls: str) -> None:
        """Worker: offer a new block to its class's sampler; train that class's first
        dictionary when its early sample is full."""
        sampler = self._samplers.get(cls)
        if sampler is None:
            return
        with self._sample_lock:
            samples = sampler.offer(data, early=self.zdicts[cls] is None)
        if samples is not None:
            self._train(samples, cls)  # outside the lock: the other workers go on without it

    def _train(self, samples: list[bytes], cls: str) -> None:
        """Train, store and start using a dictionary for one page class (samples compressed,
        as _Sampler keeps them)."""
        dict_id = self.repo.new_dictionary_id()
        try:
            trained = zstandard.train_dictionary(DICT_SIZE, expand(samples), dict_id=dict_id, level=1, **TRAIN_PARAMS)
        except zstandard.ZstdError as exc:
            log.debug("no compression dictionary trained from %d samples: %s", len(samples), exc)
            return
        zdict = self.repo.save_dictionary(trained.as_bytes(), dict_id, cls)
        if zdict is not None:
            log.info("trained compression dictionary %08x (pages: %s) from %d blocks", dict_id, cls or "other", len(samples))
            self.zdicts[cls] = zdict

    def _seal_block(self, data: bytes, check: PageCheck | None, sample: bool = True) -> BlockResult:
        """Worker: page checksums, content id, and the sealed block only when it is new.
        sample=False: not a page (block lists), compressed with the general dictionary."""
        failures = self._page_failures(memoryview(data), check)
        block_id = self.keys.block_id(data)
        if self.packs.has(block_id):
            return BlockResult(block_id, None, failures)
        cls = page_class(data) if sample else ""
        if self._sampling and sample:
            self._sample(data, cls)
        sealed = envelope.seal(self.keys, envelope.Kind.BLOCK, data, block_id, self.codec, self.level, self.zdicts[cls])
        return BlockResult(block_id, sealed, failures)

    def _merge_block(self, merge: PageMerge, check: PageCheck | None) -> BlockResult:
        """Worker: rebuild a block from its parent's content and changed pages, then seal it."""
        data = bytearray(merge.length)
        covered = len({offset for offset, _ in merge.pages}) * PAGE_SIZE >= merge.length
        if merge.parent_id is not None and merge.keep and not covered:
            # Not when the changed pages cover the block (always, with 8 KiB blocks).
            parent = self.repo.read_block(merge.parent_id, rehash=False)[: merge.keep]
            data[: len(parent)] = parent
        for offset, page in merge.pages:
            data[offset : offset + PAGE_SIZE] = page
        return self._seal_block(bytes(data), check)

    def _page_failures(self, data: memoryview, check: PageCheck | None) -> list[int]:
        """Block numbers of pages in data that fail their checksum and are older than the
        backup's start (one native call for the whole piece)."""
        if check is None:
            return []
        whole = len(data) - len(data) % PAGE_SIZE
        failures = []
        for blkno in _accel.verify_pages(data[:whole], check.first_block):
            offset = (blkno - check.first_block) * PAGE_SIZE
            if page_lsn(data[offset : offset + 8]) < check.start_lsn:
                failures.append(blkno)
        return failures

    def _seal_chunk(self, chunk: memoryview, check: PageCheck | None) -> ChunkResult:
        """Worker: consecutive blocks of one file as one task. Page checksums, content ids,
        and the sealed blocks the repository lacks, each one native call for the chunk
        (without the GIL). Every call that releases the GIL costs a worker a wait for it when
        it returns, behind the producing thread: with one busy producer, two threads
        compressing 16k blocks took 22.7 s with one call per block, 0.4 s with one per 32 (the
        GIL convoy). And Python per block holds the GIL the stream reader needs: ids through
        the blake3 package held it ~0.7 s of a first full. _accel.seal_blocks (page class,
        compression with the class's dictionary, envelope) does per chunk what Python did
        per block."""
        view = memoryview(chunk)
        size = self.block_size
        failures = self._page_failures(view, check)
        joined = _accel.block_ids(view, size, self.keys.id_key)
        new = self.packs.lacking(joined)
        count = len(joined) // 32
        if not new:
            return ChunkResult(joined, count, new, b"", b"", failures)
        zdicts = (self.zdicts[""], self.zdicts[SPECIAL_CLASS])
        out, ends, classes = _accel.seal_blocks(
            view, size, joined, new, envelope.Kind.BLOCK, self.codec, self._level, zdicts, self.keys.data_key
        )
        if self._sampling:
            self._sample_chunk(view, new, classes)
        return ChunkResult(joined, count, new, out, ends, failures)

    def _sample_chunk(self, view: memoryview, new: list[int], classes: bytes) -> None:
        """Worker: offer a chunk's new blocks to their classes' samplers, under one lock
        acquisition for the chunk; train a class's first dictionary when its early sample is
        full (as _sample). Only every SAMPLE_EVERY-th block of a class is looked at
        (_Sampler.offer_many): a Python call per new block (~190k in a first full of pgbench
        scale 100) held the GIL and the lock; py-spy put the sampling at 12% of the workers'
        samples before, 9% after."""
        size = self.block_size
        members = {
            "": [i for i, c in zip(new, classes) if not c],
            SPECIAL_CLASS: [i for i, c in zip(new, classes) if c],
        }
        full = []
        with self._sample_lock:
            for name, indices in members.items():
                sampler = self._samplers.get(name)
                if sampler is not None and indices:
                    samples = sampler.offer_many(view, size, indices, early=self.zdicts[name] is None)
                    if samples is not None:
                        full.append((samples, name))
        for samples, name in full:
            self._train(samples, name)  # outside the lock: the other workers go on without it

    def submit_chunk(
        self, chunk: memoryview, check: PageCheck | None, on_done: Callable[[ChunkResult], None]
    ) -> None:
        """Whole blocks of one file (the last may be short) as one task of ~256 KiB."""

        def done(result: ChunkResult) -> None:
            self.blocks_total += result.count
            if result.new:  # found missing from the index by the worker (lacking)
                self.blocks_new += self.packs.add_many(result.ids, result.new, result.out, result.ends)
            on_done(result)

        self.pool.submit(self._seal_chunk, chunk, check, on_done=done)

    def submit_merge(self, merge: PageMerge, check: PageCheck | None, on_done: Callable[[BlockResult], None]) -> None:
        def done(result: BlockResult) -> None:
            self._record(result)
            on_done(result)

        self.pool.submit(self._merge_block, merge, check, on_done=done)

    def _record(self, result: BlockResult) -> None:
        """In submission order, on the producing thread: add a new block to the pack."""
        self.blocks_total += 1
        if result.sealed is not None and not self.packs.has(result.block_id):
            self.packs.add(result.block_id, result.sealed)
            self.blocks_new += 1

    def store_now(self, data: bytes) -> bytes:
        """Store one small block synchronously (block lists); returns its id."""
        result = self._seal_block(data, None, sample=False)  # block lists: random ids, no sample
        if result.sealed is not None and not self.packs.has(result.block_id):
            self.packs.add(result.block_id, result.sealed)
        return result.block_id

    def store_blocklist(self, entry: FileEntry, ids: bytes) -> None:
        """entry.blocklist, as a delta of the previous backup's block list when that is small."""
        base_entry = self._bases.get((entry.tablespace, entry.path))
        if base_entry is not None and base_entry.blocklist is not None:
            base_id = base_entry.blocklist_base or base_entry.blocklist
            delta = encode_delta(self.repo.read_block(bytes.fromhex(base_id)), ids)
            if len(delta) < DELTA_MAX_SHARE * len(ids):
                entry.blocklist = self.store_now(delta).hex()
                entry.blocklist_base = base_id
                return
        entry.blocklist = self.store_now(ids).hex()

    def finish(self) -> None:
        self.pool.finish()
        with self._sample_lock:
            reservoirs = {cls: sampler.reservoir for cls, sampler in self._samplers.items()}
            self._samplers, self._sampling = {}, False
        # The last pack is finished in the background while the dictionaries later backups use
        # are trained (~0.1 s at scale 100). One class at a time: training both at once in the
        # workers saved no more wall and put 15 MB on the peak RSS (their expanded samples).
        self.packs.flush()
        for cls, samples in reservoirs.items():
            if len(samples) >= MIN_SAMPLES:
                self._train(samples, cls)
        self.packs.wait()

    def abort(self) -> None:
        """After a failure: discard the pack being filled (nothing half-written stays behind)."""
        self.packs.abort()


class _Sampler:
    """New blocks of one page class, for training its dictionary: every SAMPLE_EVERY-th goes
    to the early sample (trained once it holds early_capacity blocks) and, as a uniform sample
    of the whole backup, to the reservoir (algorithm R). Callers hold the BlockStore's lock.

    Samples are kept zstd-compressed (level 1, only when taken: a few thousand blocks per
    backup), and expanded one class at a time for training: raw, the two classes' samples
    were up to 24 MiB of a first full's peak memory.
    """

    def __init__(self, capacity: int, early_capacity: int) -> None:
        self.capacity = capacity
        self.early_capacity = early_capacity
        self.early: list[bytes] = []
        self.reservoir: list[bytes] = []
        self.seen = 0
        self.early_done = False
        self._random = random.Random()
        self._compressor = zstandard.ZstdCompressor(level=1)

    def offer(self, data: bytes | memoryview, early: bool) -> list[bytes] | None:
        """Returns the early sample (compressed, see expand) when it has just filled up (once)."""
        self.seen += 1
        if self.seen % SAMPLE_EVERY:
            return None
        return self._take(data, early)

    def offer_many(self, view: memoryview, size: int, indices: list[int], early: bool) -> list[bytes] | None:
        """offer() for the blocks view[i * size:][:size] of indices, in order, looking only at
        those offer() would not skip."""
        seen, full = self.seen, None
        # offer() takes a block when seen, counted with it, is a multiple of SAMPLE_EVERY.
        for k in range((SAMPLE_EVERY - 1 - seen) % SAMPLE_EVERY, len(indices), SAMPLE_EVERY):
            self.seen = seen + k + 1
            i = indices[k]
            full = self._take(view[i * size : (i + 1) * size], early) or full
        self.seen = seen + len(indices)
        return full

    def _take(self, data: bytes | memoryview, early: bool) -> list[bytes] | None:
        taken = self.seen // SAMPLE_EVERY
        filling = len(self.reservoir) < self.capacity
        slot = len(self.reservoir) if filling else self._random.randrange(taken)
        keep_early = early and not self.early_done
        if slot >= self.capacity and not keep_early:
            return None
        # A copy either way (a view would keep its whole chunk alive); copied once more because
        # python-zstandard returns its output in a buffer of ZSTD_compressBound (8.3 KiB for a
        # page), only marked shorter: kept as is, a sample of ~450 bytes held all 8.3 KiB.
        packed = bytes(memoryview(self._compressor.compress(data)))
        if filling:
            self.reservoir.append(packed)
        elif slot < self.capacity:
            self.reservoir[slot] = packed
        if keep_early:
            self.early.append(packed)
            if len(self.early) >= self.early_capacity:
                samples, self.early, self.early_done = self.early, [], True
                return samples
        return None


def expand(samples: list[bytes]) -> list[bytes]:
    """The blocks of compressed samples (_Sampler), for training."""
    decompressor = zstandard.ZstdDecompressor()
    return [decompressor.decompress(sample) for sample in samples]


def page_class(data: bytes | memoryview, offset: int = 0) -> str:
    """The dictionary class of a block: "s" when it starts with a PostgreSQL page that has
    special space (B-tree and the other index access methods, sequences), "" otherwise (heap,
    free space and visibility maps, non-relation files).

    One dictionary for all blocks, trained mostly on heap pages, compressed fresh B-tree
    leaf pages of pgbench 2.7x, worse than no dictionary (4.0x) and slower; a dictionary
    trained on B-tree pages compressed them 6.3x (2000 pages of pgbench_accounts_pkey).
    """
    if len(data) - offset < PAGE_SIZE:
        return ""
    lower, upper, special = _PAGE_BOUNDS.unpack_from(data, offset + 12)
    return SPECIAL_CLASS if 24 <= lower <= upper <= special < PAGE_SIZE else ""


class FileBuilder:
    """Accumulates one file's data into blocks and fills entry.blocks/blocklist when done."""

    def __init__(
        self,
        store: BlockStore,
        entry: FileEntry,
        first_block: int | None = None,
        start_lsn: int = 0,
    ) -> None:
        """first_block: verify page checksums, numbering pages from it (None: do not)."""
        self.store = store
        self.entry = entry
        self._first_block = first_block
        self._start_lsn = start_lsn
        self._failures: list[int] = []
        self.block_size = store.block_size
        entry.block_size = self.block_size
        self._parts: list[memoryview] = []  # stream pieces not yet submitted, under one chunk
        self._size = 0
        self._ids = bytearray()  # 32 bytes a block, zeros until its id is known
        self._pending = 0
        self._closed = False

    def write(self, data: memoryview) -> None:
        """Collect stream pieces (references, no copy) until a chunk is full, then join them:
        one copy per byte. Copying into a bytearray and slicing chunks out of it cost three
        (0.5-0.9 s of the producing thread's time per 1.5 GB)."""
        self._parts.append(data)
        self._size += len(data)
        if self._size < CHUNK_BYTES:
            return
        joined = memoryview(b"".join(self._parts))
        whole = len(joined) - len(joined) % CHUNK_BYTES
        for pos in range(0, whole, CHUNK_BYTES):
            self._submit(joined[pos : pos + CHUNK_BYTES])
        rest = joined[whole:]
        self._parts = [rest] if len(rest) else []
        self._size = len(rest)

    def _submit(self, chunk: memoryview) -> None:
        """Hand a chunk of whole blocks (the file's last may be short) to the pool."""
        first = self._reserve(-(-len(chunk) // self.block_size))
        self._pending += 1

        def on_done(result: ChunkResult) -> None:
            self._ids[first * 32 : first * 32 + len(result.ids)] = result.ids
            self._failures.extend(result.checksum_failures)
            self._pending -= 1
            if self._closed and not self._pending:
                self._complete()

        self.store.submit_chunk(chunk, self._check(first), on_done)

    def _reserve(self, count: int) -> int:
        """Append count empty slots for block ids; returns the first slot's index."""
        first = len(self._ids) // 32
        self._ids += bytes(32 * count)
        return first

    def _check(self, slot: int) -> PageCheck | None:
        if self._first_block is None:
            return None
        return PageCheck(self._first_block + slot * self.block_size // PAGE_SIZE, self._start_lsn)

    def _filler(self, slot: int) -> Callable[[BlockResult], None]:
        """A completion callback that puts the block's id into its slot."""
        self._pending += 1

        def on_done(result: BlockResult) -> None:
            self._ids[slot * 32 : (slot + 1) * 32] = result.block_id
            self._failures.extend(result.checksum_failures)
            self._pending -= 1
            if self._closed and not self._pending:
                self._complete()

        return on_done

    def _fill_known(self, slot: int, block_id: bytes) -> None:
        """A block the repository already has (an unchanged block of the parent backup)."""
        self._ids[slot * 32 : (slot + 1) * 32] = block_id
        self.store.blocks_total += 1

    def close(self) -> None:
        if self._size:
            self._submit(memoryview(b"".join(self._parts)))
            self._parts, self._size = [], 0
        self._closed = True
        if not self._pending:
            self._complete()

    def _complete(self) -> None:
        ids = bytes(self._ids)
        self._ids = bytearray()
        if self._failures:
            self.entry.checksum_failures = sorted(self._failures)
        if len(ids) <= INLINE_BLOCKS * 32:
            self.entry.blocks = [ids[i : i + 32].hex() for i in range(0, len(ids), 32)]
        else:
            self.store.store_blocklist(self.entry, ids)
