"""Rebuild whole files from PG17 `INCREMENTAL.<name>` members and the parent backup.

An incremental file is (host byte order):

    u32 magic 0xD3AE1F0D | u32 n | u32 truncation length in pages | u32 block numbers[n]
    | zero padding to a multiple of 8192 when n > 0 | n pages, in block-number order

The rebuilt file has max(truncation length, highest block + 1) pages. A page comes from the
incremental file if listed, else from the parent's file if below the truncation length, else
zeros (research/replication-protocol.md, byte-identical to pg_combinebackup). pgvault stores the
result as ordinary blocks, so the manifest stays complete and every backup restores alone: an
unchanged block reuses the parent's block id without reading it; a block with changed pages is
rebuilt in a worker from the parent's block and the new pages.
"""

from __future__ import annotations

import struct
from collections import Counter

from pgvault.errors import PostgresError
from pgvault.pg.relfile import PAGE_SIZE
from pgvault.repository.blockstore import BlockStore, FileBuilder, PageMerge
from pgvault.repository.manifest import FileEntry

MAGIC = 0xD3AE1F0D
PREFIX = "INCREMENTAL."


def full_name(path: str) -> str | None:
    """'base/5/INCREMENTAL.16384.1' -> 'base/5/16384.1'; None for an ordinary file."""
    directory, _, name = path.rpartition("/")
    if not name.startswith(PREFIX):
        return None
    return f"{directory}/{name[len(PREFIX):]}" if directory else name[len(PREFIX) :]


class IncrementalFileBuilder(FileBuilder):
    def __init__(
        self,
        store: BlockStore,
        entry: FileEntry,
        parent_ids: list[bytes],
        parent_size: int,
        first_block: int | None,
        start_lsn: int,
    ) -> None:
        super().__init__(store, entry, first_block, start_lsn)
        self._parent_ids = parent_ids
        self._parent_size = parent_size
        self._head = bytearray()
        self._header_len: int | None = None
        self._block_numbers: list[int] = []
        self._next_page = 0  # index into _block_numbers of the page being received
        self._page = bytearray()
        self._waiting: dict[int, list[tuple[int, bytes]]] = {}
        self._expected: Counter[int] = Counter()
        self._pages_per_block = self.block_size // PAGE_SIZE
        self._out_pages = 0
        self._truncation = 0
        self._first_slot = 0

    def write(self, data: memoryview) -> None:
        pos = 0
        if self._header_len is None or len(self._head) < self._header_len:
            pos = self._read_header(data)
        while pos < len(data):
            take = min(PAGE_SIZE - len(self._page), len(data) - pos)
            self._page += data[pos : pos + take]
            pos += take
            if len(self._page) == PAGE_SIZE:
                self._page_done(bytes(self._page))
                self._page.clear()

    def _read_header(self, data: memoryview) -> int:
        pos = 0
        if self._header_len is None:
            take = min(12 - len(self._head), len(data))
            self._head += data[:take]
            pos = take
            if len(self._head) < 12:
                return pos
            magic, count, self._truncation = struct.unpack_from("<III", self._head)
            if magic != MAGIC:
                raise PostgresError(f"{self.entry.path}: not a PostgreSQL incremental file (bad magic)")
            length = 12 + 4 * count
            self._header_len = length + (-length) % PAGE_SIZE if count else length
        take = min(self._header_len - len(self._head), len(data) - pos)
        self._head += data[pos : pos + take]
        pos += take
        if len(self._head) == self._header_len:
            self._start_pages()
        return pos

    def _start_pages(self) -> None:
        count = struct.unpack_from("<I", self._head, 4)[0]
        self._block_numbers = list(struct.unpack_from(f"<{count}I", self._head, 12))
        self._out_pages = max([self._truncation, *(b + 1 for b in self._block_numbers)])
        self.entry.size = self._out_pages * PAGE_SIZE
        blocks = -(-self._out_pages // self._pages_per_block)
        self._first_slot = self._reserve(blocks)
        self._expected = Counter(b // self._pages_per_block for b in self._block_numbers)
        for block in range(blocks):
            if block not in self._expected:
                self._emit(block, ())

    def _page_done(self, page: bytes) -> None:
        if self._next_page >= len(self._block_numbers):
            raise PostgresError(f"{self.entry.path}: incremental file has more pages than its header lists")
        number = self._block_numbers[self._next_page]
        self._next_page += 1
        block = number // self._pages_per_block
        waiting = self._waiting.setdefault(block, [])
        waiting.append(((number % self._pages_per_block) * PAGE_SIZE, page))
        if len(waiting) == self._expected[block]:
            del self._waiting[block]
            self._emit(block, tuple(waiting))

    def _emit(self, block: int, pages: tuple[tuple[int, bytes], ...]) -> None:
        slot = self._first_slot + block
        start_page = block * self._pages_per_block
        length = min(self._pages_per_block, self._out_pages - start_page) * PAGE_SIZE
        keep = max(0, min(length, (self._truncation - start_page) * PAGE_SIZE))
        parent_id = self._parent_ids[block] if block < len(self._parent_ids) else None
        parent_length = max(0, min(self.block_size, self._parent_size - block * self.block_size))
        if parent_id is None:
            keep = 0
        if not pages and parent_id is not None and keep == length == parent_length:
            self._fill_known(slot, parent_id)
            return
        merge = PageMerge(parent_id if keep else None, keep, length, pages)
        self.store.submit_merge(merge, self._check(slot), self._filler(slot))

    def close(self) -> None:
        if self._header_len is None or len(self._head) < self._header_len or self._page or self._waiting:
            raise PostgresError(f"{self.entry.path}: incremental file ended early")
        if self._next_page != len(self._block_numbers):
            raise PostgresError(f"{self.entry.path}: incremental file has fewer pages than its header lists")
        self._closed = True
        if not self._pending:
            self._complete()
