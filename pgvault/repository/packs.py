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

from pgvault.backends.base import Backend
from pgvault.pipeline import codecs, envelope
from pgvault.pipeline.crypto import Keys
from pgvault.repository import layout
from pgvault.repository.index import Index, encode_entries

PACK_MAGIC = b"PGVP"
TAIL = struct.Struct("<I4s")
# A pack is flushed when full or when its first block is this old, so that a backup killed on a
# slow link loses at most this much work: the rerun finds every flushed block and skips it.
MAX_AGE = 60.0


def new_pack_name() -> str:
    return os.urandom(16).hex()


class PackWriter:
    """Collects sealed blocks and flushes a pack when it reaches target_size.

    Not thread-safe: one writer per backup, fed from the thread that orders results (has()
    may be called from any thread). background=True: a flushed pack is sealed and written by
    a writer thread while the next one fills (at most one pack in flight, so one more pack
    buffer of memory). On a first full of pgbench scale 100 the producing thread spent ~0.8 s
    in flushes (0.1 s per 32 MiB pack written and fsynced, the rest compressing the trailer
    and index object), time in which it fed the workers nothing. Call wait() at the end.
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
        self._buffer = bytearray()
        self._entries: list[tuple[bytes, int, int]] = []
        self._pending: set[bytes] = set()
        # Ids of the pack being written in the background: replaced, never mutated, so has()
        # on another thread sees them here or (after the write) in the index.
        self._flushing: frozenset[bytes] = frozenset()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pgvault-packs") if background else None
        self._in_flight: Future[None] | None = None
        self.bytes_written = 0
        self.packs_written = 0

    def has(self, block_id: bytes) -> bool:
        return block_id in self._pending or block_id in self._flushing or block_id in self._index

    def add(self, block_id: bytes, sealed: bytes) -> None:
        if self.has(block_id):
            return
        if not self._entries:
            self._opened = time.monotonic()
        self._entries.append((block_id, len(self._buffer), len(sealed)))
        self._buffer += sealed
        self._pending.add(block_id)
        if len(self._buffer) >= self._target or time.monotonic() - self._opened >= self._max_age:
            self.flush()

    def flush(self) -> None:
        if not self._entries:
            return
        buffer, entries = self._buffer, self._entries
        if self._executor is None:
            self._write(buffer, entries)
            self._pending.clear()
        else:
            self._wait_in_flight()
            self._flushing = frozenset(self._pending)
            self._pending = set()
            self._in_flight = self._executor.submit(self._write, buffer, entries)
        self._buffer = bytearray()
        self._entries = []

    def wait(self) -> None:
        """Wait for a background write (raising its error) and stop the writer thread."""
        try:
            self._wait_in_flight()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    def _wait_in_flight(self) -> None:
        future, self._in_flight = self._in_flight, None
        if future is not None:
            future.result()

    def _write(self, buffer: bytearray, pack_entries: list[tuple[bytes, int, int]]) -> None:
        name = new_pack_name()
        entries = encode_entries(name, pack_entries)
        trailer = envelope.seal(
            self._keys, envelope.Kind.PACK_TRAILER, entries, name.encode(), codecs.Codec.ZSTD
        )
        buffer += trailer + TAIL.pack(len(trailer), PACK_MAGIC)
        # The buffer itself, not a bytes() copy: a copy doubled peak memory at every flush.
        self._backend.put(layout.pack_key(name), buffer)
        index_obj = envelope.seal(
            self._keys, envelope.Kind.INDEX, entries, layout.index_key(name).encode(), codecs.Codec.ZSTD
        )
        self._backend.put(layout.index_key(name), index_obj)
        self._index.add_pack(name, entries[2 + len(name) :])  # the ENTRY records, past the name
        self._flushing = frozenset()
        self.bytes_written += len(buffer) + len(index_obj)
        self.packs_written += 1
