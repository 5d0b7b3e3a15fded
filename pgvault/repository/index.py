"""Where each block lives: block id -> (pack, offset, length).

Persisted as one index object per pack, written right after the pack, so the index on the
backend only ever names packs that exist.

In memory the index must stay small as the database grows (a dict of Location objects cost
~300 bytes a block, and peak RSS grew with it: 65 MB at pgbench scale 100, 132 MB at 300). So it
is a few tables of fixed 32-byte records (16 bytes of the id, offset, length, pack number) in one
bytes object each, bucketed by the leading 16 bits of the id (more beyond ~4M blocks). Block ids are keyed
BLAKE3 digests, so those bits are uniform. A lookup compares the id with the records of its
bucket (pgvault._accel: native, or a pure-Python twin that uses ``bytes.find``). Tables are
built by a counting sort, with no per-record Python objects. Each pack a running backup adds
becomes a small table; tables merge bucket by bucket like a log-structured tree (a table merges
into the one before while that one is at most twice its size), so there are O(log n) tables.

No table grows past MAX_TABLE_RECORDS: a merge builds a new table before the old ones go, so an
unbounded merge held the whole index twice at its peak (2 x 28 MB at pgbench scale 300), and
loading held every index object's entries besides the table built from them. Loading builds a
table per batch of index objects, and merges stop at the bound; a lookup asks all tables in one
native call (index_find_any), so the extra tables cost ~0.05 us each.

Past MEMORY_RECORDS records the tables move into a DiskTable (repository/diskindex.py: a local
temporary file read with pread), so memory no longer grows with the repository: the tables hold
only the records added since the last move. A lookup asks the tables first, then the file.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from pgvault import _accel
from pgvault.errors import IntegrityError
from pgvault.repository.diskindex import DiskTable
from pgvault.repository.diskindex import bits_for as disk_bits_for

ENTRY = struct.Struct("<32sQI")  # on disk: block id, offset in pack, stored length
ID_SIZE = 32
RECORD = struct.Struct("<32sQII")  # a REF record (the read path): an ENTRY and the pack's number
# In memory (the tables): the first 16 bytes of the id, then as RECORD. Two stored blocks whose
# ids share 16 bytes would be taken for one (a backup would not store the second): with n
# blocks the odds are ~n^2 / 2^129, 1.5e-21 for a billion blocks, and a block read by a wrong
# record fails authentication (the envelope's context is the whole id), so it is never wrong
# silently. 32 bytes a block instead of 48.
TABLE_RECORD = struct.Struct("<16sQII")
KEY_SIZE = 16
# Records of a table at most (4 MiB), so that building or merging one never holds more than
# twice that besides the index; ~4.6 tables at pgbench scale 300 (595k blocks).
MAX_TABLE_RECORDS = 1 << 17
# Records in memory at most (4 MiB) before they move to the index file on disk: a repository of
# up to ~1 GiB of unique 8 KiB blocks never uses the file. PGVAULT_INDEX_MEMORY_RECORDS sets
# another bound (the tests use a small one, so that small repositories use the file too).
MEMORY_RECORDS = int(os.environ.get("PGVAULT_INDEX_MEMORY_RECORDS") or MAX_TABLE_RECORDS)
_PACK_NO = struct.Struct("<I")


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int


def encode_header(pack: str) -> bytes:
    """What precedes the ENTRY records of an index object (and of a pack trailer)."""
    name = pack.encode("ascii")
    return struct.pack("<H", len(name)) + name


def decode_body(data: bytes) -> tuple[str, memoryview]:
    """The pack name and the raw ENTRY records of an index object, without unpacking them."""
    (name_len,) = struct.unpack_from("<H", data)
    pack = data[2 : 2 + name_len].decode("ascii")
    body = memoryview(data)[2 + name_len :]
    if len(body) % ENTRY.size:
        raise IntegrityError(f"index for pack {pack} is truncated")
    return pack, body


def unpack_entries(body: memoryview) -> list[tuple[bytes, int, int]]:
    """The (id, offset, length) entries of a body from decode_body."""
    return [ENTRY.unpack_from(body, pos) for pos in range(0, len(body), ENTRY.size)]


class _Table:
    """Immutable bucketed records (see the module docstring); the loops are in pgvault._accel."""

    __slots__ = ("data", "starts", "bits", "count")

    def __init__(self, data: bytes, starts: bytes, bits: int) -> None:
        self.data = data
        self.starts = starts
        self.bits = bits
        self.count = len(data) // TABLE_RECORD.size

    @staticmethod
    def bits_for(count: int) -> int:
        """16 bits (65536 buckets, 256 KiB of bucket starts) up to ~4M records, so that tables
        of the same width merge bucket by bucket; more beyond, to keep buckets short."""
        return max(16, min(24, (count // 64).bit_length()))

    @classmethod
    def build(cls, sources: Sequence[tuple[bytes | memoryview, int | None]]) -> _Table:
        """sources: (ENTRY records, pack number) or (TABLE_RECORD records, None). A counting sort."""
        count = sum(len(body) // (TABLE_RECORD.size if pno is None else ENTRY.size) for body, pno in sources)
        bits = cls.bits_for(count)
        spec = [
            (body, TABLE_RECORD.size, b"") if pno is None else (body, ENTRY.size, _PACK_NO.pack(pno))
            for body, pno in sources
        ]
        data, starts = _accel.index_build(spec, bits)
        return cls(data, starts, bits)

    @classmethod
    def merge(cls, a: _Table, b: _Table) -> _Table:
        """One table holding both; bucket by bucket (no per-record work) when widths agree."""
        bits = cls.bits_for(a.count + b.count)
        if not a.bits == b.bits == bits:
            return cls.build([(a.data, None), (b.data, None)])
        data, starts = _accel.index_merge(a.data, a.starts, b.data, b.starts)
        return cls(data, starts, bits)

    def find(self, block_id: bytes) -> int:
        """Byte offset of the record of block_id, or -1."""
        return _accel.index_find(self.data, self.starts, self.bits, block_id)


class Index:
    """Thread-safe map of block ids to locations. If a block is in several packs, any copy
    may be returned (they are identical). close() releases the index files at once (they are
    unlinked from the start, and closed with the object otherwise)."""

    def __init__(self) -> None:
        self._packs: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        # The tables, each as index_find_any takes it, and the index file (None until records
        # move there): replaced together, never mutated, so readers use a consistent snapshot.
        # A record moving to the file stays in the snapshot's tables until the file has it.
        self._state: tuple[tuple[_Table, ...], tuple[tuple[bytes, bytes, int], ...], DiskTable | None] = ((), (), None)
        self._retired: list[DiskTable] = []  # files replaced by larger ones: closed by close()
        self._lock = threading.Lock()

    @property
    def _tables(self) -> tuple[_Table, ...]:
        return self._state[0]

    def __contains__(self, block_id: bytes) -> bool:
        _, specs, disk = self._state
        if _accel.index_find_any(specs, block_id) >= 0:
            return True
        return disk is not None and self._disk_locate(disk, block_id) is not None

    def __len__(self) -> int:
        """Records, so a block stored in two packs counts twice."""
        tables, _, disk = self._state
        return sum(t.count for t in tables) + (disk.count if disk is not None else 0)

    def get(self, block_id: bytes) -> Location | None:
        tables, specs, disk = self._state
        k = _accel.index_find_any(specs, block_id)
        if k >= 0:
            table = tables[k]
            _, offset, length, pno = TABLE_RECORD.unpack_from(table.data, table.find(block_id))
            return Location(self._packs[pno], offset, length)
        if disk is None:
            return None
        ref = self._disk_locate(disk, block_id)
        if ref is None:
            return None
        _, offset, length, pno = RECORD.unpack(ref)
        return Location(self._packs[pno], offset, length)

    @staticmethod
    def _disk_locate(disk: DiskTable, block_id: bytes) -> bytearray | None:
        out = bytearray(RECORD.size)
        return out if disk.locate(block_id, out) else None

    def locate_many(self, ids: bytes | bytearray | memoryview) -> tuple[bytearray, int]:
        """One 48-byte record (RECORD: id, offset, length, pack number) per 32-byte id of ids,
        with length 0 where the index lacks the id, and how many it lacks: many lookups in one
        native call per table, then one for the index file (the read path; see pack_name)."""
        out = bytearray(len(ids) // ID_SIZE * RECORD.size)
        if len(ids) % ID_SIZE:
            raise IntegrityError("block list is truncated")
        remaining = len(ids) // ID_SIZE
        tables, _, disk = self._state
        for table in tables:
            if not remaining:
                break
            remaining -= _accel.index_locate(table.data, table.starts, table.bits, ids, out)
        if remaining and disk is not None:
            remaining -= disk.locate(ids, out)
        elif not tables:  # an empty index: every record names its id, with length 0
            for k in range(len(ids) // ID_SIZE):
                out[k * RECORD.size : k * RECORD.size + ID_SIZE] = ids[k * ID_SIZE : (k + 1) * ID_SIZE]
        return out, remaining

    def missing(self, ids: bytes | bytearray | memoryview) -> list[int]:
        """Positions of the 32-byte ids of ids the index lacks (a backup's presence checks,
        one call per chunk)."""
        refs, remaining = self.locate_many(ids)
        if not remaining:
            return []
        lengths = memoryview(refs).cast("I")[10 :: RECORD.size // 4]
        return [k for k, length in enumerate(lengths) if not length]

    def pack_name(self, number: int) -> str:
        return self._packs[number]

    def _number(self, pack: str) -> int:
        pno = self._pack_numbers.get(pack)
        if pno is None:
            pno = self._pack_numbers[pack] = len(self._packs)
            self._packs.append(pack)
        return pno

    def load(self, packs: Iterable[tuple[str, bytes | memoryview]]) -> None:
        """Add many index objects' ENTRY records: one table per MAX_TABLE_RECORDS of them, built
        as soon as a batch is complete, so a batch's index objects are dropped early (a
        generator of decoded index objects is never held whole)."""
        with self._lock:
            batch: list[tuple[bytes | memoryview, int]] = []
            records = 0
            for pack, body in packs:
                batch.append((body, self._number(pack)))
                records += len(body) // ENTRY.size
                if records >= MAX_TABLE_RECORDS:
                    self._add_table(_Table.build(batch))
                    batch, records = [], 0
            if batch:
                self._add_table(_Table.build(batch))
            tables, _, disk = self._state
            if disk is not None and tables:  # the rest too: memory holds only what a run adds
                self._spill(list(tables), disk)

    def add_pack(self, pack: str, entries: Iterable[tuple[bytes, int, int]] | bytes) -> None:
        """One pack's entries: (id, offset, length) tuples, or their ENTRY encoding."""
        body = entries if isinstance(entries, bytes) else b"".join(ENTRY.pack(*e) for e in entries)
        with self._lock:
            self._add_table(_Table.build([(body, self._number(pack))]))

    def close(self) -> None:
        """Close the index files (the index is unusable afterwards)."""
        with self._lock:
            _, _, disk = self._state
            self._state = ((), (), None)
            for table in self._retired + ([disk] if disk is not None else []):
                table.close()
            self._retired = []

    def _add_table(self, table: _Table) -> None:
        """Publish a new table; merge while the one before is at most twice its size and the
        merged table stays within MAX_TABLE_RECORDS; past MEMORY_RECORDS, move them all to the
        index file."""
        tables = [t for t in self._tables if t.count] + [table]
        while (
            len(tables) > 1
            and tables[-2].count <= 2 * tables[-1].count
            and tables[-2].count + tables[-1].count <= MAX_TABLE_RECORDS
        ):
            last = tables.pop()
            tables[-1] = _Table.merge(tables[-1], last)
        disk = self._state[2]
        self._publish(tables, disk)
        if sum(t.count for t in tables) > MEMORY_RECORDS:
            self._spill(tables, disk)

    def _spill(self, tables: list[_Table], disk: DiskTable | None) -> None:
        """Move every table's records to the index file (a larger one if they do not fit)."""
        disk = self._disk_with_room(disk, sum(t.count for t in tables))
        for t in tables:
            _insert(disk, t)
        self._publish([], disk)

    def _publish(self, tables: list[_Table], disk: DiskTable | None) -> None:
        self._state = (tuple(tables), tuple((t.data, t.starts, t.bits) for t in tables), disk)

    def _disk_with_room(self, disk: DiskTable | None, records: int) -> DiskTable:
        """The index file, or a larger one holding its records (sized for twice what it will
        hold, so that growing costs O(records) over a whole run); the old one is retired."""
        if disk is not None and disk.room_for(records):
            return disk
        total = records + (disk.count if disk is not None else 0)
        grown = DiskTable(disk_bits_for(2 * total))
        if disk is not None:
            for region in disk.records_by_region():
                if region:
                    _insert(grown, _Table.build([(region, None)]))
            self._retired.append(disk)
        return grown


def _insert(disk: DiskTable, table: _Table) -> None:
    """Add a table's records to the index file, regrouped first when the table's buckets are
    coarser than the file's (DiskTable.insert takes whole groups a bucket)."""
    if table.bits < disk.bits:
        data, starts = _accel.index_build([(table.data, TABLE_RECORD.size, b"")], disk.bits)
        disk.insert(data, starts, disk.bits)
    else:
        disk.insert(table.data, table.starts, table.bits)
