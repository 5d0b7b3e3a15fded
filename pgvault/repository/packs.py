"""Packs: many sealed blocks in one object, so object stores see few, large writes.

    pack := block* | trailer | trailer length u32 LE | "PGVP"
    trailer := envelope(kind PACK_TRAILER, context = pack name) of the index entries

The trailer makes each pack self-describing, so the index can always be rebuilt from packs.
Order of writes: pack, then its index object, then (much later) the manifest that uses it.
Each flushed pack is immediately usable by later backups (resume after a kill).
"""

from __future__ import annotations

import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor

from pgvault.backends.base import Backend, Upload, open_upload
from pgvault.pipeline import codecs, envelope
from pgvault.pipeline.crypto import Keys
from pgvault.repository import layout
from pgvault.repository.index import ENTRY, Index, encode_header

PACK_MAGIC = b"PGVP"
TAIL = struct.Struct("<I4s")
# A pack is flushed when full or when its first block is this old, so that a backup killed on a
# slow link loses at most this much work: the rerun finds every flushed block and skips it.
MAX_AGE = 60.0
# Bytes of a pack collected before they are handed to the backend's upload (one write call).
WRITE_BUFFER = 1 << 20


def new_pack_name() -> str:
    return os.urandom(16).hex()


class PackWriter:
    """Streams sealed blocks into a pack and finishes it when it reaches target_size.

    A pack is written to the backend as it fills (Backend upload: on the filesystem its temp
    file, so only WRITE_BUFFER bytes of it are in memory; backends that cannot stream collect
    it in memory and put it whole). Finishing a pack (trailer, commit, index object) is the
    slow part (fsync of 32 MiB, compressing trailer and index object: ~0.8 s of the producing
    thread per first full of pgbench scale 100), so with background=True a writer thread does
    it while the next pack fills (at most one pack finishing at a time). Not thread-safe: one
    writer per backup, fed from the thread that orders results (has() may be called from any
    thread). Call wait() at the end, or abort() on failure (discards the unfinished pack).
    """

    def __init__(
        self, backend: Backend, keys: Keys, index: Index, target_size: int, max_age: float = MAX_AGE,
        background: bool = False,
    ) -> None:
        self._backend = backend
        self._keys = keys
        self._index = index
        self._target = target_size
        self._max_age = max_age
        self._opened = 0.0
        self._name = ""
        self._upload: Upload | None = None
        self._size = 0  # bytes of the open pack so far
        self._buffer = bytearray()  # its bytes not yet handed to the upload
        self._entries = bytearray()  # its index.ENTRY records
        self._pending: set[bytes] = set()
        # Ids of the pack being finished in the background: replaced, never mutated, so has()
        # on another thread sees them here or (after the write) in the index.
        self._flushing: frozenset[bytes] = frozenset()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pgvault-packs") if background else None
        self._in_flight: Future[None] | None = None
        self.bytes_written = 0
        self.packs_written = 0

    def has(self, block_id: bytes) -> bool:
        return block_id in self._pending or block_id in self._flushing or block_id in self._index

    def lacking(self, ids: bytes) -> list[int]:
        """Positions of the 32-byte ids of ids that neither the index nor this writer has: one
        index call for them all (a lookup in the index file is a pread), then the writer's
        own sets for the few the index lacks."""
        pending, flushing = self._pending, self._flushing
        return [
            k for k in self._index.missing(ids)
            if (block_id := ids[k * 32 : k * 32 + 32]) not in pending and block_id not in flushing
        ]

    def add(self, block_id: bytes, sealed: bytes | memoryview, index_checked: bool = False) -> bool:
        """Append a sealed block unless this writer or the index has it; True if appended.
        index_checked: the caller found it missing from the index (lacking) moments ago, so
        only this writer's blocks are checked (the producing thread would pay a pread per
        new block otherwise). A block the index gained since then can only be one of this
        writer's packs, finished in between: stored twice at worst, which is harmless."""
        if block_id in self._pending or block_id in self._flushing:
            return False
        if not index_checked and block_id in self._index:
            return False
        if self._upload is None:
            self._open()
        self._entries += ENTRY.pack(block_id, self._size, len(sealed))
        if len(sealed) >= WRITE_BUFFER:  # a large object (a block list): written, not copied
            self._write_buffered(force=True)
            assert self._upload is not None
            self._upload.write(sealed)
        else:
            self._buffer += sealed
            self._write_buffered()
        self._size += len(sealed)
        self._pending.add(block_id)
        if self._size >= self._target or time.monotonic() - self._opened >= self._max_age:
            self.flush()
        return True

    def add_many(self, ids: bytes, new: list[int], sealed: bytes | memoryview, ends: bytes) -> int:
        """add(index_checked=True) for one chunk's new blocks (BlockStore.submit_chunk): block
        new[k] has the id ids[32 * new[k]:][:32] and the sealed object sealed[ends[k - 1]:ends[k]]
        (ends: u64 each, as _accel.seal_blocks returns them); returns how many were appended.
        One call per chunk instead of one per block, and the bytes of consecutive blocks
        appended in one copy."""
        pending = self._pending
        view = memoryview(sealed)
        appended = 0
        start = run_start = run_end = 0  # run: sealed[run_start:run_end], not yet in the buffer
        for i, end in zip(new, memoryview(ends).cast("Q")):
            block_id = ids[i * 32 : i * 32 + 32]
            if block_id in pending or block_id in self._flushing:  # a copy just added
                start = end
                continue
            if self._upload is None:
                self._open()
            if start != run_end:
                self._buffer += view[run_start:run_end]
                run_start = start
            run_end = end
            self._entries += ENTRY.pack(block_id, self._size, end - start)
            pending.add(block_id)
            self._size += end - start
            appended += 1
            start = end
            if self._size >= self._target:
                self._buffer += view[run_start:run_end]
                run_start = run_end
                self.flush()
                pending = self._pending  # a new set: the flushed ones are in _flushing now
        if run_end > run_start:
            self._buffer += view[run_start:run_end]
        if self._upload is not None:
            self._write_buffered()
            if time.monotonic() - self._opened >= self._max_age:
                self.flush()
        return appended

    def _open(self) -> None:
        self._name = new_pack_name()
        self._upload = open_upload(self._backend, layout.pack_key(self._name))
        self._opened = time.monotonic()

    def _write_buffered(self, force: bool = False) -> None:
        """Hand the buffered bytes to the upload once there are WRITE_BUFFER of them (with
        force, whatever there is)."""
        if len(self._buffer) >= WRITE_BUFFER or (force and self._buffer):
            assert self._upload is not None
            self._upload.write(self._buffer)
            self._buffer = bytearray()

    def flush(self) -> None:
        """Finish the open pack (in the background with background=True)."""
        upload = self._upload
        if upload is None:
            return
        if self._buffer:
            upload.write(self._buffer)
        name, entries, size = self._name, self._entries, self._size
        self._upload, self._buffer, self._entries, self._size = None, bytearray(), bytearray(), 0
        if self._executor is None:
            self._finish(name, upload, entries, size)
            self._pending.clear()
        else:
            try:
                self._wait_in_flight()
            except BaseException:
                upload.abort()
                raise
            self._flushing = frozenset(self._pending)
            self._pending = set()
            self._in_flight = self._executor.submit(self._finish, name, upload, entries, size)

    def wait(self) -> None:
        """Wait for a background write (raising its error) and stop the writer thread."""
        try:
            self._wait_in_flight()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def abort(self) -> None:
        """After a failure: discard the open pack, wait for the one finishing (its error is
        dropped: the caller is already failing) and stop the writer thread."""
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.abort()
        self._buffer, self._entries, self._pending = bytearray(), bytearray(), set()
        try:
            self.wait()
        except Exception:
            pass

    def _wait_in_flight(self) -> None:
        future, self._in_flight = self._in_flight, None
        if future is not None:
            future.result()

    def _finish(self, name: str, upload: Upload, records: bytearray, size: int) -> None:
        """Trailer, commit, then the index object: a pack is complete before any index names it."""
        try:
            entries = encode_header(name) + records
            trailer = envelope.seal(
                self._keys, envelope.Kind.PACK_TRAILER, entries, name.encode(), codecs.Codec.ZSTD
            )
            upload.write(trailer + TAIL.pack(len(trailer), PACK_MAGIC))
            upload.commit()
        except BaseException:
            upload.abort()
            raise
        index_obj = envelope.seal(
            self._keys, envelope.Kind.INDEX, entries, layout.index_key(name).encode(), codecs.Codec.ZSTD
        )
        self._backend.put(layout.index_key(name), index_obj)
        self._index.add_pack(name, bytes(records))
        self._flushing = frozenset()
        self.bytes_written += size + len(trailer) + TAIL.size + len(index_obj)
        self.packs_written += 1
