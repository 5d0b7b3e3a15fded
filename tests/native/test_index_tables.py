"""The block index's table primitives: native and pure-Python give identical tables."""

from __future__ import annotations

import random
import struct
from types import ModuleType

import pytest

from tests.native.impls import IMPLS, native
from pgvault import _pure as pure

ENTRY = struct.Struct("<32sQI")


def _sources(rnd: random.Random) -> list[tuple[bytes, int, bytes]]:
    out = []
    for pno in range(5):
        out.append((b"".join(ENTRY.pack(rnd.randbytes(32), rnd.randrange(1 << 40), rnd.randrange(1 << 30))
                             for _ in range(rnd.randrange(0, 400))), 44, struct.pack("<I", pno)))
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_build_find_merge(impl: ModuleType) -> None:
    rnd = random.Random(11)
    sources = _sources(rnd)
    data, starts = impl.index_build(sources, 8)
    assert (data, starts) == pure.index_build(sources, 8)
    records = {data[i : i + 32] for i in range(0, len(data), 32)}
    entries = {body[i : i + 44] + tail for body, _, tail in sources for i in range(0, len(body), 44)}
    assert records == {e[:16] + e[32:] for e in entries}  # 16 bytes of the id, offset, length, pack
    for entry in entries:
        pos = impl.index_find(data, starts, 8, entry[:32])
        assert data[pos : pos + 32] == entry[:16] + entry[32:]
        assert impl.index_find(data, starts, 8, entry[:16] + rnd.randbytes(16)) == pos  # the key is 16 bytes
    assert impl.index_find(data, starts, 8, rnd.randbytes(32)) == -1
    other, other_starts = impl.index_build([(data, 32, b"")], 8)  # table records rebuild as is
    assert sorted(other[i : i + 32] for i in range(0, len(other), 32)) == sorted(records)
    more = _sources(rnd)
    data2, starts2 = impl.index_build(more, 8)
    merged = impl.index_merge(data, starts, data2, starts2)
    assert merged == pure.index_merge(data, starts, data2, starts2)
    rebuilt = impl.index_build(sources + more, 8)
    assert merged[1] == rebuilt[1]  # same buckets; within a bucket the order may differ
    assert sorted(merged[0][i : i + 32] for i in range(0, len(merged[0]), 32)) == sorted(
        rebuilt[0][i : i + 32] for i in range(0, len(rebuilt[0]), 32)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.index_build([(b"x" * 44, 40, b"")], 8)
    with pytest.raises(ValueError):
        impl.index_build([(b"x" * 45, 44, b"abcd")], 8)
    with pytest.raises(ValueError):
        impl.index_build([(b"x" * 48, 48, b"")], 8)  # 48-byte records are REF records, not tables
    with pytest.raises(ValueError):
        impl.index_build([], 0)
    data, starts = impl.index_build([], 4)
    with pytest.raises(ValueError):
        impl.index_find(data, starts, 4, b"short")
    with pytest.raises(ValueError):
        impl.index_find(data, starts, 5, b"x" * 32)
    other = impl.index_build([], 5)
    with pytest.raises(ValueError):
        impl.index_merge(data, starts, *other)


def test_native_is_built_or_skipped() -> None:
    assert native is None or native.IMPL == "native"


@pytest.mark.parametrize("impl", IMPLS)
def test_find_any_names_the_first_table_holding_an_id(impl: ModuleType) -> None:
    rnd = random.Random(12)
    tables = []
    for bits in (8, 16, 8):
        data, starts = impl.index_build(_sources(rnd), bits)
        tables.append((data, starts, bits))
    for k, (data, starts, bits) in enumerate(tables):
        for pos in range(0, len(data), 32 * 37):
            block_id = data[pos : pos + 16] + bytes(16)  # a lookup compares 16 bytes
            assert impl.index_find_any(tables, block_id) == k == pure.index_find_any(tables, block_id)
    missing = rnd.randbytes(32)
    assert impl.index_find_any(tables, missing) == -1 == pure.index_find_any(tables, missing)
    assert impl.index_find_any([], missing) == -1
    dup = tables[2][0][:16] + bytes(16)
    assert impl.index_find_any([tables[2], tables[0], tables[2]], dup) == 0
    with pytest.raises(ValueError):
        impl.index_find_any(tables, b"short")
    with pytest.raises(ValueError):
        impl.index_find_any([(tables[0][0], tables[0][1], 9)], missing)
