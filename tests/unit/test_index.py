"""The compact in-memory block index against a plain dict, and its memory per block.

These tests are about the tables, so they keep every record in memory (MEMORY_RECORDS
raised); tests/unit/test_diskindex.py covers records moving to the index file.
"""

from __future__ import annotations

import os
import random
import sys

import pytest

from pgvault.repository import index as index_mod
from pgvault.repository.index import ENTRY, Index, Location


@pytest.fixture(autouse=True)
def _records_stay_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "MEMORY_RECORDS", 1 << 40)


def _entries(rnd: random.Random, n: int) -> list[tuple[bytes, int, int]]:
    return [(rnd.randbytes(32), rnd.randrange(1 << 40), rnd.randrange(1 << 31)) for _ in range(n)]


def test_lookups_match_a_dict_through_loads_and_merges() -> None:
    rnd = random.Random(7)
    index = Index()
    expect: dict[bytes, Location] = {}
    loaded = {f"pack{i}": _entries(rnd, rnd.randrange(0, 300)) for i in range(20)}
    index.load((p, b"".join(ENTRY.pack(*e) for e in es)) for p, es in loaded.items())
    for pack, entries in loaded.items():
        for block_id, offset, length in entries:
            expect.setdefault(block_id, Location(pack, offset, length))
    for i in range(40):  # packs added while a backup runs: small tables that merge
        entries = _entries(rnd, rnd.randrange(1, 500))
        index.add_pack(f"new{i}", entries)
        for block_id, offset, length in entries:
            expect.setdefault(block_id, Location(f"new{i}", offset, length))
    assert len(index._tables) <= 2 * len(expect).bit_length()
    for block_id, loc in expect.items():
        assert block_id in index
        assert index.get(block_id) == loc
    for _ in range(2000):
        assert index.get(rnd.randbytes(32)) is None


def test_a_block_in_two_packs_is_found_in_either() -> None:
    index = Index()
    block_id = os.urandom(32)
    index.add_pack("a", [(block_id, 10, 20)])
    index.add_pack("b", [(block_id, 30, 20)])
    assert index.get(block_id) in (Location("a", 10, 20), Location("b", 30, 20))
    assert len(index) == 2


def test_an_id_straddling_two_records_is_not_a_match() -> None:
    """bytes.find may match across record fields or boundaries; only aligned matches are keys."""
    index = Index()
    first, second = b"\x11" * 32, b"\x11" * 2 + b"\x22" * 30  # one bucket
    index.add_pack("p", [(first, 0x1111111111111111, 0x11111111), (second, 1, 1)])
    fake = b"\x11" * 12 + b"\x00" * 4 + b"\x33" * 16  # offset, length and pack number of first
    assert fake not in index and index.get(fake) is None
    assert index.get(second) == Location("p", 1, 1)


def test_ids_are_keyed_by_their_first_16_bytes() -> None:
    """Documented (index.TABLE_RECORD): ids sharing 16 bytes are one key (odds ~n^2 / 2^129)."""
    index = Index()
    block_id = os.urandom(32)
    index.add_pack("p", [(block_id, 7, 9)])
    assert index.get(block_id[:16] + os.urandom(16)) == Location("p", 7, 9)
    assert os.urandom(16) + block_id[16:] not in index


def test_memory_per_block_is_about_thirty_five_bytes() -> None:
    rnd = random.Random(3)
    index = Index()
    entries = _entries(rnd, 100000)
    index.load([("p", b"".join(ENTRY.pack(*e) for e in entries))])
    size = sum(sys.getsizeof(t.data) + sys.getsizeof(t.starts) for t in index._tables)
    assert size / len(entries) < 36


def test_tables_stay_within_the_bound_through_loads_and_merges(monkeypatch) -> None:
    """No table grows past MAX_TABLE_RECORDS (no merge copies the whole index), loading
    consumes index objects batch by batch, and lookups still find every id."""
    monkeypatch.setattr(index_mod, "MAX_TABLE_RECORDS", 1000)
    rnd = random.Random(9)
    loaded = {f"pack{i}": _entries(rnd, 150) for i in range(30)}
    consumed = []

    def bodies():
        for pack, entries in loaded.items():
            consumed.append(pack)
            yield pack, b"".join(ENTRY.pack(*e) for e in entries)

    index = Index()
    index.load(bodies())
    assert len(consumed) == 30 and len(index) == 4500
    assert all(t.count <= 1000 + 150 for t in index._tables) and len(index._tables) >= 4
    expect = {block_id: Location(p, o, n) for p, es in loaded.items() for block_id, o, n in es}
    for i in range(60):
        entries = _entries(rnd, 100)
        index.add_pack(f"new{i}", entries)
        expect.update((block_id, Location(f"new{i}", o, n)) for block_id, o, n in entries)
    assert all(t.count <= 1000 + 150 for t in index._tables)
    for block_id, loc in expect.items():
        assert block_id in index and index.get(block_id) == loc
    refs, missing = index.locate_many(b"".join(expect) + rnd.randbytes(32))
    assert missing == 1
