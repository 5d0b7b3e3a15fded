"""Where each block lives: block id -> (pack, offset, length).

Persisted as one index object per pack, written right after the pack, so the index on the
backend only ever names packs that exist.

In memory the index must stay small as the database grows (a dict of Location objects cost
~300 bytes a block, and peak RSS grew with it: 65 MB at pgbench scale 100, 132 MB at 300). So it
is a few tables of fixed 48-byte records (id, offset, length, pack number) in one bytes object
each, bucketed by the leading bits of the id, ~8 records a bucket. Block ids are keyed BLAKE3
digests, so those bits are uniform. A lookup is one ``bytes.find`` of the id within its bucket,
in C. The tables are built by a counting sort (no per-record Python objects). Packs added while
a backup runs become small tables that merge like a log-structured tree (a table merges into
the one before while that one is at most twice its size), so there are O(log n) tables.
"""

from __future__ import annotations

import struct
import threading
from array import array
from dataclasses import dataclass
from typing import Iterable, Sequence

from pgvault.errors import IntegrityError

ENTRY = struct.Struct("<32sQI")  # on disk: block id, offset in pack, stored length
ID_SIZE = 32
RECORD = struct.Struct("<32sQII")  # in memory: an ENTRY followed by the pack's number
_PREFIX_44 = struct.Struct(">I40x")  # the leading 32 bits of the id of an ENTRY
_PREFIX_48 = struct.Struct(">I44x")  # ... of a RECORD
_PACK_NO = struct.Struct("<I")
PER_BUCKET = 8


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int


def encode_entries(pack: str, entries: Iterable[tuple[bytes, int, int]]) -> bytes:
    name = pack.encode("ascii")
    out = bytearray(struct.pack("<H", len(name)) + name)
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


def decode_entries(data: bytes) -> tuple[str, list[tuple[bytes, int, int]]]:
    pack, body = decode_body(data)
    return pack, [ENTRY.unpack_from(body, pos) for pos in range(0, len(body), ENTRY.size)]


class _Table:
    """Immutable bucketed records; see the module docstring."""

    __slots__ = ("data", "starts", "shift", "count")

    def __init__(self, data: bytes, starts: array, shift: int, count: int) -> None:
        self.data = data
        self.starts = starts
        self.shift = shift
        self.count = count

    @classmethod
    def build(cls, sources: Sequence[tuple[bytes | memoryview, int | None]]) -> _Table:
        """sources: (ENTRY records, pack number) or (RECORD records, None)."""
        count = sum(len(body) // (RECORD.size if pno is None else ENTRY.size) for body, pno in sources)
        bits = max(1, min(24, (count // PER_BUCKET).bit_length()))
        shift = 32 - bits
        counts = array("I", bytes(4 * ((1 << bits) + 1)))
        for body, pno in sources:
            for (prefix,) in (_PREFIX_48 if pno is None else _PREFIX_44).iter_unpack(body):
                counts[(prefix >> shift) + 1] += 1
        for b in range(1, len(counts)):
            counts[b] += counts[b - 1]
        starts = array("I", counts)
        out = bytearray(count * RECORD.size)
        fill = counts  # fill[b]: the next free record of bucket b
        size = RECORD.size
        for body, pno in sources:
            if pno is None:
                for pos, (prefix,) in zip(range(0, len(body), size), _PREFIX_48.iter_unpack(body)):
                    b = prefix >> shift
                    dst = fill[b] * size
                    fill[b] += 1
                    out[dst : dst + size] = body[pos : pos + size]
            else:
                tail = _PACK_NO.pack(pno)
                step = ENTRY.size
                for pos, (prefix,) in zip(range(0, len(body), step), _PREFIX_44.iter_unpack(body)):
                    b = prefix >> shift
                    dst = fill[b] * size
                    fill[b] += 1
                    out[dst : dst + step] = body[pos : pos + step]
                    out[dst + step : dst + size] = tail
        return cls(bytes(out), starts, shift, count)

    def find(self, block_id: bytes) -> int:
        """Byte offset of the record of block_id, or -1."""
        b = int.from_bytes(block_id[:4], "big") >> self.shift
        lo = self.starts[b] * RECORD.size
        hi = self.starts[b + 1] * RECORD.size
        pos = self.data.find(block_id, lo, hi)
        while pos >= 0 and (pos - lo) % RECORD.size:  # a match across two records: not an id
            pos = self.data.find(block_id, pos + 1, hi)
        return pos


class Index:
    """Thread-safe map of block ids to locations. If a block is in several packs, any copy
    may be returned (they are identical)."""

    def __init__(self) -> None:
        self._packs: list[str] = []
        self._pack_numbers: dict[str, int] = {}
        self._tables: list[_Table] = []  # replaced, never mutated: readers take a snapshot
        self._lock = threading.Lock()

    def _find(self, block_id: bytes) -> tuple[_Table, int] | None:
        for table in self._tables:
            pos = table.find(block_id)
            if pos >= 0:
                return table, pos
        return None

    def __contains__(self, block_id: bytes) -> bool:
        return self._find(block_id) is not None

    def __len__(self) -> int:
        """Records, so a block stored in two packs counts twice."""
        return sum(t.count for t in self._tables)

    def get(self, block_id: bytes) -> Location | None:
        found = self._find(block_id)
        if found is None:
            return None
        table, pos = found
        _, offset, length, pno = RECORD.unpack_from(table.data, pos)
        return Location(self._packs[pno], offset, length)

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

    def add_pack(self, pack: str, entries: Iterable[tuple[bytes, int, int]]) -> None:
        with self._lock:
            body = b"".join(ENTRY.pack(*entry) for entry in entries)
            self._add_table(_Table.build([(body, self._number(pack))]))

    def _add_table(self, table: _Table) -> None:
        tables = [t for t in self._tables if t.count] + [table]
        while len(tables) > 1 and tables[-2].count <= 2 * tables[-1].count:
            last = tables.pop()
            tables[-1] = _Table.build([(tables[-1].data, None), (last.data, None)])
        self._tables = tables
