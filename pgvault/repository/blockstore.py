"""Turns streamed file contents into stored blocks and FileEntry block lists.

Files are cut into fixed, aligned blocks of the repository's block size (files smaller than
a block go whole). Each block is hashed, and only blocks the repository lacks are compressed,
sealed and appended to a pack, in the worker pool.
"""

from __future__ import annotations

from typing import Callable

from pgvault.pipeline import codecs, envelope
from pgvault.pipeline.pool import OrderedPool
from pgvault.repository.manifest import INLINE_BLOCKS, FileEntry
from pgvault.repository.packs import PackWriter
from pgvault.repository.repository import Repository

BlockResult = tuple[bytes, "bytes | None", int]


class BlockStore:
    """One per backup: owns the pack writer and the pool; counts what it stored."""

    def __init__(self, repo: Repository, pool: OrderedPool[BlockResult], codec: codecs.Codec, level: int | None) -> None:
        self.repo = repo
        self.keys = repo.keys
        self.block_size = repo.settings.block_size
        self.pool = pool
        self.codec = codec
        self.level = level
        self.packs = PackWriter(repo.backend, repo.keys, repo.index, repo.settings.pack_size)
        self.blocks_total = 0
        self.blocks_new = 0

    def _seal_block(self, data: bytes) -> BlockResult:
        """Worker: content id, and the sealed block only when the repository lacks it."""
        block_id = self.keys.block_id(data)
        if self.packs.has(block_id):
            return block_id, None, len(data)
        return block_id, envelope.seal(self.keys, envelope.Kind.BLOCK, data, block_id, self.codec, self.level), len(data)

    def submit(self, data: bytes, on_id: Callable[[bytes], None]) -> None:
        def done(result: BlockResult) -> None:
            block_id, sealed, _size = result
            self.blocks_total += 1
            if sealed is not None and not self.packs.has(block_id):
                self.packs.add(block_id, sealed)
                self.blocks_new += 1
            on_id(block_id)

        self.pool.submit(self._seal_block, data, on_done=done)

    def store_now(self, data: bytes) -> bytes:
        """Store one small block synchronously (block lists); returns its id."""
        block_id, sealed, _ = self._seal_block(data)
        if sealed is not None and not self.packs.has(block_id):
            self.packs.add(block_id, sealed)
        return block_id

    def finish(self) -> None:
        self.pool.finish()
        self.packs.flush()


class FileBuilder:
    """Accumulates one file's data into blocks and fills entry.blocks/blocklist when done."""

    def __init__(self, store: BlockStore, entry: FileEntry, on_complete: Callable[[FileEntry], None]) -> None:
        self.store = store
        self.entry = entry
        self.on_complete = on_complete
        self.block_size = store.block_size
        entry.block_size = self.block_size
        self._buffer = bytearray()
        self._ids: list[bytes | None] = []
        self._pending = 0
        self._closed = False

    def write(self, data: memoryview) -> None:
        buf = self._buffer
        size = self.block_size
        if not buf and len(data) >= size:
            # Fast path: whole blocks straight from the stream buffer.
            whole = len(data) - len(data) % size
            for pos in range(0, whole, size):
                self._submit(bytes(data[pos : pos + size]))
            data = data[whole:]
        buf += data
        while len(buf) >= size:
            self._submit(bytes(buf[:size]))
            del buf[:size]

    def _submit(self, block: bytes) -> None:
        slot = len(self._ids)
        self._ids.append(None)
        self._pending += 1

        def on_id(block_id: bytes) -> None:
            self._ids[slot] = block_id
            self._pending -= 1
            if self._closed and not self._pending:
                self._complete()

        self.store.submit(block, on_id)

    def close(self) -> None:
        if self._buffer:
            self._submit(bytes(self._buffer))
            self._buffer = bytearray()
        self._closed = True
        if not self._pending:
            self._complete()

    def _complete(self) -> None:
        ids = [i for i in self._ids if i is not None]
        assert len(ids) == len(self._ids)
        if len(ids) <= INLINE_BLOCKS:
            self.entry.blocks = [i.hex() for i in ids]
        else:
            self.entry.blocklist = self.store.store_now(b"".join(ids)).hex()
        self.on_complete(self.entry)
