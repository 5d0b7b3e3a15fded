"""The index file (repository/diskindex.py): its kernels native against pure, and the Index
with records moved to it, against a plain dict."""

from __future__ import annotations

import random
import threading

import pytest

from pgvault import _pure
from pgvault.repository import diskindex
from pgvault.repository import index as index_mod
from pgvault.repository.index import ENTRY, RECORD, Index, Location

try:
    from pgvault import _native
except ImportError:  # pragma: no cover - a build without the extension
    _native = None

IMPLS = [_pure] + ([_native] if _native is not None else [])


def _entries(rnd: random.Random, n: int) -> list[tuple[bytes, int, int]]:
    return [(rnd.randbytes(32), rnd.randrange(1 << 40), rnd.randrange(1, 1 << 31)) for _ in range(n)]


def _records_homed(rnd: random.Random, bits: int, homes: list[int]) -> bytes:
    """32-byte table records whose home buckets (top bits of the first 4 bytes) are homes."""
    out = []
    for home in homes:
        prefix = (home << (32 - bits)) | rnd.getrandbits(32 - bits)
        out.append(prefix.to_bytes(4, "big") + rnd.randbytes(28))
    return b"".join(out)


@pytest.mark.skipif(_native is None, reason="native module not built")
def test_kernels_native_and_pure_agree() -> None:
    """Random regions, crowded buckets (more than a bucket's 127 slots: overflow flags and
    records carried past the region), carried records, record extraction, and lookups."""
    rnd = random.Random(11)
    for _ in range(60):
        bits = rnd.randint(1, 7)
        first = rnd.randrange(1 << bits)
        count = rnd.randint(1, (1 << bits) - first)
        crowded = first + rnd.randrange(count)
        homes = [crowded if rnd.random() < 0.5 else first + rnd.randrange(count) for _ in range(rnd.randint(0, 600))]
        records = _records_homed(rnd, bits, homes)
        carry = rnd.random() < 0.3
        regions = [bytearray(count * diskindex.BUCKET) for _ in IMPLS]
        rests = [impl.bucket_fill(region, first, bits, records, carry) for impl, region in zip(IMPLS, regions)]
        assert regions[0] == regions[1] and rests[0] == rests[1]
        assert _pure.bucket_records(regions[0]) == _native.bucket_records(regions[0])
        placed = len(_pure.bucket_records(regions[0])) + len(rests[0])
        assert placed == len(records)


def test_bucket_fill_rejects_records_homed_outside_the_region() -> None:
    for impl in IMPLS:
        region = bytearray(2 * diskindex.BUCKET)
        with pytest.raises(ValueError, match="outside the region"):
            impl.bucket_fill(region, 0, 4, _records_homed(random.Random(1), 4, [5]), False)
        with pytest.raises(ValueError, match="outside the file"):
            impl.bucket_fill(region, 15, 4, b"", False)
        bad = bytearray(diskindex.BUCKET)
        bad[0:4] = (200).to_bytes(4, "little")
        with pytest.raises(ValueError, match="claims 200 records"):
            impl.bucket_records(bad)


@pytest.fixture
def small_memory(monkeypatch: pytest.MonkeyPatch) -> int:
    """Records move to the index file past 500 in memory."""
    monkeypatch.setattr(index_mod, "MEMORY_RECORDS", 500)
    return 500


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.IMPL)
def test_index_with_records_on_disk_matches_a_dict(small_memory: int, impl, monkeypatch) -> None:
    for name in ("bucket_fill", "bucket_records", "disk_locate", "index_build", "index_merge", "index_locate",
                 "index_find", "index_find_any"):
        monkeypatch.setattr(index_mod._accel, name, getattr(impl, name))
    rnd = random.Random(5)
    index = Index()
    loaded = {f"pack{i}": _entries(rnd, rnd.randrange(0, 400)) for i in range(15)}
    index.load((p, b"".join(ENTRY.pack(*e) for e in es)) for p, es in loaded.items())
    expect = {block_id: Location(p, o, n) for p, es in loaded.items() for block_id, o, n in es}
    for i in range(70):  # a backup adding packs: the file grows past its first size
        entries = _entries(rnd, rnd.randrange(1, 600))
        index.add_pack(f"new{i}", entries)
        expect.update((block_id, Location(f"new{i}", o, n)) for block_id, o, n in entries)
    tables, _, disk = index._state
    assert disk is not None and disk.count > 0 and index._retired
    assert sum(t.count for t in tables) <= small_memory
    assert len(index) == len(expect)
    for block_id, loc in expect.items():
        assert block_id in index and index.get(block_id) == loc
    absent = [rnd.randbytes(32) for _ in range(300)]
    assert not any(a in index for a in absent) and all(index.get(a) is None for a in absent)
    ids = list(expect)
    query = b"".join(ids) + b"".join(absent)
    refs, missing = index.locate_many(query)
    assert missing == len(absent)
    for k, block_id in enumerate(ids):
        got_id, offset, length, pno = RECORD.unpack_from(refs, k * RECORD.size)
        assert got_id == block_id and Location(index.pack_name(pno), offset, length) == expect[block_id]
    assert index.missing(query) == list(range(len(ids), len(ids) + len(absent)))
    index.close()


def test_crowded_and_wrapping_buckets_are_found(small_memory: int) -> None:
    """More records than a bucket holds in one home, and in the last bucket (they continue at
    the first): every one is found, and an absent id homed there is not."""
    rnd = random.Random(8)
    index = Index()
    index.add_pack("seed", _entries(rnd, 600))  # moves to a file of 2**bits buckets
    bits = index._state[2].bits
    crowd = _records_homed(rnd, bits, [0] * 200 + [(1 << bits) - 1] * 300)
    entries = [(crowd[k : k + 4] + rnd.randbytes(28), k, 1 + k) for k in range(0, len(crowd), 32)]
    index.add_pack("crowd", entries)
    index.add_pack("push", _entries(rnd, 100))  # moves the crowd into that same file
    tables, _, disk = index._state
    assert not tables and disk.bits == bits and not index._retired
    for block_id, offset, length in entries:
        assert index.get(block_id) == Location("crowd", offset, length)
    assert index.get(_records_homed(rnd, bits, [(1 << bits) - 1])[:32]) is None


def test_lookups_on_other_threads_never_miss_while_records_move(small_memory: int) -> None:
    """A backup's workers look up blocks while the pack writer's thread adds packs and moves
    records to the file (and replaces it by a larger one): a known block is always found."""
    rnd = random.Random(3)
    index = Index()
    first = _entries(rnd, 450)
    index.add_pack("first", first)
    known = [block_id for block_id, _, _ in first]
    batches = [_entries(rnd, 300) for _ in range(40)]
    errors: list[str] = []
    done = threading.Event()

    def look() -> None:
        while not done.is_set():
            refs, missing = index.locate_many(b"".join(known))
            if missing:
                errors.append(f"{missing} known blocks missed")
            if any(k not in index for k in known[:20]):
                errors.append("a known block missed")

    lookers = [threading.Thread(target=look) for _ in range(2)]
    for t in lookers:
        t.start()
    for i, batch in enumerate(batches):
        index.add_pack(f"p{i}", batch)
    done.set()
    for t in lookers:
        t.join()
    assert not errors and index._retired
    assert all(index.get(block_id) == Location(f"p{i}", o, n) for i, b in enumerate(batches) for block_id, o, n in b)


def test_memory_stays_at_the_bound_as_the_index_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default bound, the tables hold at most MEMORY_RECORDS records (32 bytes each)
    while packs are added, and nothing once a load ends with the index in the file."""
    rnd = random.Random(4)
    index = Index()
    for i in range(30):
        index.add_pack(f"p{i}", b"".join(ENTRY.pack(*e) for e in _entries(rnd, 10000)))
        tables, _, disk = index._state
        assert sum(len(t.data) for t in tables) <= index_mod.MEMORY_RECORDS * 32
    assert disk is not None and disk.count + sum(t.count for t in tables) == 300000
    loaded = Index()
    loaded.load((f"p{i}", b"".join(ENTRY.pack(*e) for e in _entries(rnd, 10000))) for i in range(30))
    tables, _, disk = loaded._state
    assert not tables and disk is not None and disk.count == len(loaded) == 300000
    index.close()
    loaded.close()


def test_index_files_are_not_in_tmp_unless_tmpdir_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """/tmp is often a tmpfs (memory): the file goes to $TMPDIR, else /var/tmp."""
    monkeypatch.delenv("TMPDIR", raising=False)
    assert diskindex.spill_directory() == "/var/tmp"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert diskindex.spill_directory() == str(tmp_path)


def test_an_unwritable_temporary_directory_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A backup whose index needs the file, with TMPDIR pointing nowhere: a ConfigError naming
    the directory and the way out, not a traceback."""
    from pgvault.errors import ConfigError

    monkeypatch.setattr(index_mod, "MEMORY_RECORDS", 10)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    index = Index()
    with pytest.raises(ConfigError, match=r"block index file in .*missing failed: .*set TMPDIR"):
        index.add_pack("p", _entries(random.Random(1), 50))
