"""Where each block lives: block id -> (pack, offset, length).

Persisted as one index object per pack, written right after the pack, so the index on the
backend only ever names packs that exist.

In memory the index must stay small as the database grows (a dict of Location objects cost
~300 bytes a block, and peak RSS grew with it: 65 MB at pgbench scale 100, 132 MB at 300). So it
is a few tables of fixed 48-byte records (id, offset, length, pack number) in one bytes object
each, bucketed by the leading 16 bits of the id (more beyond ~4M blocks). Block ids are keyed
BLAKE3 digests, so those bits are uniform. A lookup compares the id with the records of its
bucket (pgvault._accel: native, or a pure-Python twin that uses ``bytes.find``). Tables are
built by a counting sort, with no per-record Python objects. Each pack a running backup adds
becomes a small table; tables merge bucket by bucket like a log-structured tree (a table merges
into the one before while that one is at most twice its size), so there are O(log n) tables.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from pgvault import _accel
from pgvault.errors import IntegrityError

ENTRY = struct.Struct("<32sQI")  # on disk: block id, offset in pack, stored length
ID_SIZE = 32
RECORD = struct.Struct("<32sQII")  # in memory: an ENTRY followed by the pack's number
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


def encode_entries(pack: str, entries: Iterable[tuple[bytes, int, int]]) -> bytes:
    out = bytearray(encode_header(pack))
    for block_id, offset, length in entries:
        out += ENTRY.pack(block_id, offset, length)
    return bytes(out)


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
        self.count = len(data) // RECORD.size

    @staticmethod
    def bits_for(count: int) -> int:
        """16 bits (65536 buckets, 256 KiB of bucket starts) up to ~4M records, so that tables
        of the same width merge bucket by bucket; more beyond, to keep buckets short."""
        return max(16, min(24, (count // 64).bit_length()))

    @classmethod
    def build(cls, sources: Sequence[tuple[bytes | memoryview, int | None]]) -> _Table:
        """sources: (ENTRY records, pack number) or (RECORD records, None). A counting sort."""
        count = sum(len(body) // (RECORD.size if pno is None else ENTRY.size) for body, pno in sources)
        bits = cls.bits_for(count)
        spec = [(body, RECORD.size, b"") if pno is None else (body, ENTRY.size, _PACK_NO.pack(pno)) for body, pno in sources]
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
    may be returned (they are identical)."""

    def __init__(self) -> None:
        self._packs: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        self._tables: list[_Table] = []  # replaced, never mutated: readers use a snapshot
        self._lock = threading.Lock()

    def __contains__(self, block_id: bytes) -> bool:
        for table in self._tables:
            if table.find(block_id) >= 0:
                return True
        return False

    def __len__(self) -> int:
        """Records, so a block stored in two packs counts twice."""
        return sum(t.count for t in self._tables)

    def get(self, block_id: bytes) -> Location | None:
        for table in self._tables:
            pos = table.find(block_id)
            if pos >= 0:
                _, offset, length, pno = RECORD.unpack_from(table.data, pos)
                return Location(self._packs[pno], offset, length)
        return None

    def locate_many(self, ids: bytes | bytearray | memoryview) -> tuple[bytearray, int]:
        """One 48-byte record (RECORD: id, offset, length, pack number) per 32-byte id of ids,
        with length 0 where the index lacks the id, and how many it lacks: many lookups in one
        native call per table (the read path; see pack_name)."""
        out = bytearray(len(ids) // ID_SIZE * RECORD.size)
        if len(ids) % ID_SIZE:
            raise IntegrityError("block list is truncated")
        remaining = len(ids) // ID_SIZE
        tables = self._tables
        for table in tables:
            if not remaining:
                break
            remaining -= _accel.index_locate(table.data, table.starts, table.bits, ids, out)
        if not tables:  # an empty index: every record names its id, with length 0
            for k in range(len(ids) // ID_SIZE):
                out[k * RECORD.size : k * RECORD.size + ID_SIZE] = ids[k * ID_SIZE : (k + 1) * ID_SIZE]
        return out, remaining

    def pack_name(self, number: int) -> str:
        return self._packs[number]

    def _number(self, pack: str) -> int:
        pno = self._pack_numbers.get(pack)
        if pno is None:
            pno = self._pack_numbers[pack] = len(self._packs)
            self._packs.append(pack)
        return pno

    def load(self, packs: Iterable[tuple[str, bytes | memoryview]]) -> None:
        """Add many index objects' ENTRY records at once, as one table."""
        with self._lock:
            sources = [(body, self._number(pack)) for pack, body in packs]
            self._add_table(_Table.build(sources))

    def add_pack(self, pack: str, entries: Iterable[tuple[bytes, int, int]] | bytes) -> None:
        """One pack's entries: (id, offset, length) tuples, or their ENTRY encoding."""
        body = entries if isinstance(entries, bytes) else b"".join(ENTRY.pack(*e) for e in entries)
        with self._lock:
            self._add_table(_Table.build([(body, self._number(pack))]))

    def _add_table(self, table: _Table) -> None:
        """Publish a new table; merge while the one before is at most twice its size."""
        tables = [t for t in self._tables if t.count] + [table]
        while len(tables) > 1 and tables[-2].count <= 2 * tables[-1].count:
            last = tables.pop()
            tables[-1] = _Table.merge(tables[-1], last)
        self._tables = tables
