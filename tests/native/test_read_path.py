"""The read path's native functions (open_blocks, refs_*, index_locate) against their pure twins:
identical outputs and identical fault messages, on good and damaged packs, plain and encrypted."""

from __future__ import annotations

import os
import random
import struct
from types import ModuleType

import pytest
import zstandard

from pgvault import _pure as pure
from pgvault.errors import IntegrityError
from pgvault.pipeline import codecs, crypto, envelope
from pgvault.pipeline.envelope import Kind
from tests.native.impls import IMPLS, native

REF = struct.Struct("<32sQII")
PAGE = bytes(range(256)) * 32  # compressible 8 KiB


def _zdict(rnd: random.Random) -> zstandard.ZstdCompressionDict:
    samples = [PAGE[: rnd.randrange(1000, 8192)] + rnd.randbytes(64) for _ in range(200)]
    return zstandard.train_dictionary(4096, samples, dict_id=40000 + rnd.randrange(1000))


def _pack(keys: crypto.Keys, rnd: random.Random, zdict: zstandard.ZstdCompressionDict, n: int = 40) -> tuple[bytes, bytes, list[bytes]]:
    """A pack of n sealed blocks of every codec; returns (pack bytes, REF records, plaintexts)."""
    pack = bytearray(rnd.randbytes(rnd.randrange(0, 50)))  # blocks need not start at offset 0
    refs = bytearray()
    plains = []
    for k in range(n):
        kind = rnd.randrange(4)
        data = PAGE[: rnd.randrange(0, 8193)] if kind != 3 else rnd.randbytes(rnd.randrange(1, 3000))
        codec = [codecs.Codec.ZSTD, codecs.Codec.LZ4, codecs.Codec.NONE, codecs.Codec.ZSTD][kind]
        block_id = keys.block_id(data)
        sealed = envelope.seal(keys, Kind.BLOCK, data, block_id, codec, zdict=zdict if k % 3 == 0 else None)
        refs += REF.pack(block_id, len(pack), len(sealed), 7)
        pack += sealed
        plains.append(data)
    return bytes(pack), bytes(refs), plains


@pytest.fixture(params=["plain", "encrypted"])
def keys(request: pytest.FixtureRequest) -> crypto.Keys:
    return crypto.new_keys(None if request.param == "plain" else b"pw")[0]


def _key(keys: crypto.Keys) -> bytes | None:
    return keys.data_key


@pytest.mark.parametrize("impl", IMPLS)
def test_open_blocks_good_pack(impl: ModuleType, keys: crypto.Keys) -> None:
    rnd = random.Random(1)
    zdict = _zdict(rnd)
    pack, refs, plains = _pack(keys, rnd, zdict)
    dicts = {zdict.dict_id(): zdict}.__getitem__
    out, spans, faults = impl.open_blocks(pack, 0, refs, 0, len(plains), _key(keys), Kind.BLOCK, dicts, True)
    assert faults == []
    assert out == b"".join(plains)
    assert list(struct.unpack(f"<{len(plains)}Q", spans)) == [len(p) for p in plains]
    # a window: a ranged read that starts at the 5th block, opening blocks 5..19
    start = REF.unpack_from(refs, 5 * 48)[1]
    end = sum(REF.unpack_from(refs, 19 * 48)[1:3])
    out, _, faults = impl.open_blocks(memoryview(pack)[start:end], start, refs, 5, 15, _key(keys), Kind.BLOCK, dicts, True)
    assert (out, faults) == (b"".join(plains[5:20]), [])
    assert impl.open_blocks(pack, 0, refs, 0, len(plains), _key(keys), Kind.BLOCK, None, False) == (None, None, [])


@pytest.mark.parametrize("seed", range(6))
def test_open_blocks_damage_same_faults(keys: crypto.Keys, seed: int) -> None:
    """Flipped bytes, wrong ids, wrong kind, truncated data, a missing dictionary: the native
    and pure implementations report the same faults with the same words."""
    if native is None:
        pytest.skip("pgvault._native is not built")
    rnd = random.Random(seed)
    zdict = _zdict(rnd)
    pack, refs, plains = _pack(keys, rnd, zdict)
    broken = bytearray(pack)
    for _ in range(8):
        broken[rnd.randrange(len(broken))] ^= 1 << rnd.randrange(8)
    recs = bytearray(refs)
    recs[48 * 3] ^= 1  # another block's id: the context no longer matches
    struct.pack_into("<I", recs, 48 * 4 + 40, 10)  # a stored length too short
    cut = bytes(broken[: len(broken) - 100])  # the last block lies beyond the data read

    def missing(dict_id: int) -> zstandard.ZstdCompressionDict:
        raise IntegrityError(f"compression dictionary {dict_id:08x} is missing from the repository")

    for dicts in ({zdict.dict_id(): zdict}.__getitem__, missing, None):
        for decompress in (True, False):
            for kind in (Kind.BLOCK, Kind.WAL):
                args = (cut, 0, bytes(recs), 0, len(plains), _key(keys), kind, dicts, decompress)
                got = native.open_blocks(*args)
                assert got == pure.open_blocks(*args)
                assert got[2], "damage went unnoticed"
    other = crypto.new_keys(None if keys.encrypted else b"pw")[0]  # the wrong kind of repository
    args = (pack, 0, refs, 0, len(plains), _key(other), Kind.BLOCK, None, True)
    assert native.open_blocks(*args) == pure.open_blocks(*args)


def test_open_blocks_messages_match_envelope(keys: crypto.Keys) -> None:
    """A damaged block fails with the words envelope.open_ uses for the same damage."""
    rnd = random.Random(3)
    pack, refs, plains = _pack(keys, rnd, _zdict(rnd), n=3)
    for pos, expect in ((0, "bad magic"), (4, "format version"), (5, "expected")):
        offset = REF.unpack_from(refs, 0)[1]
        broken = bytearray(pack)
        broken[offset + pos] ^= 0x40
        _, _, faults = pure.open_blocks(bytes(broken), 0, refs, 0, 1, _key(keys), Kind.BLOCK, None, True)
        sealed = bytes(broken[offset : offset + REF.unpack_from(refs, 0)[2]])
        with pytest.raises(IntegrityError) as exc:
            envelope.open_(keys, sealed, REF.unpack_from(refs, 0)[0], Kind.BLOCK)
        assert faults == [(0, str(exc.value))] and expect in faults[0][1]


@pytest.mark.parametrize("impl", IMPLS)
def test_refs_sort_and_runs(impl: ModuleType) -> None:
    rnd = random.Random(5)
    recs = [REF.pack(rnd.randbytes(32), rnd.randrange(1 << 20) * 16, rnd.randrange(1, 5000), rnd.randrange(3))
            for _ in range(300)]
    # a damaged index: same pack and offset, other length or id; offsets past 2**40 sort too
    recs += [REF.pack(rnd.randbytes(32), 4096, rnd.randrange(1, 9), 1) for _ in range(5)]
    recs += [REF.pack(rnd.randbytes(32), rnd.randrange(1 << 50), 7, 2) for _ in range(3)]
    blob = b"".join(recs + recs[:50])  # duplicates go
    out = impl.refs_sort(blob)
    assert out == pure.refs_sort(blob)
    keyed = sorted(set(recs), key=lambda r: (REF.unpack(r)[3], REF.unpack(r)[1], REF.unpack(r)[2], r[:32]))
    assert out == b"".join(keyed)
    assert impl.refs_sort(blob[: 48 * 305]) == pure.refs_sort(blob[: 48 * 305])  # no big offsets: radix
    for args in ((0, 300, 1 << 20, 1 << 16, 64), (10, 200, 4096, 0, 3), (0, 0, 100, 0, 1), (299, 1, 1, 0, 1)):
        runs = impl.refs_runs(out, *args)
        assert runs == pure.refs_runs(out, *args)
        assert [i for a, b in runs for i in range(a, b)] == list(range(args[0], args[0] + args[1]))
    # contiguous blocks of one pack in file order make one run (what restore reads)
    seq = b"".join(REF.pack(bytes(32), 100 + 10 * k, 10, 1) for k in range(20))
    assert impl.refs_runs(seq, 0, 20, 1 << 20, 0, 8) == [(0, 8), (8, 16), (16, 20)]
    assert impl.refs_runs(seq, 0, 20, 55, 0, 100) == [(0, 5), (5, 10), (10, 15), (15, 20)]


@pytest.mark.parametrize("impl", IMPLS)
def test_index_locate(impl: ModuleType) -> None:
    rnd = random.Random(9)
    entries = b"".join(struct.pack("<32sQI", rnd.randbytes(32), rnd.randrange(1 << 40), rnd.randrange(1, 1 << 30))
                       for _ in range(500))
    data, starts = pure.index_build([(entries, 44, struct.pack("<I", 4))], 8)
    ids = [entries[i : i + 32] for i in range(0, len(entries), 44)][::3] + [rnd.randbytes(32) for _ in range(5)]
    blob = b"".join(ids)
    out = bytearray(len(ids) * 48)
    assert impl.index_locate(data, starts, 8, blob, out) == len(ids) - 5
    expect = bytearray(len(ids) * 48)
    pure.index_locate(data, starts, 8, blob, expect)
    assert out == expect
    for k, block_id in enumerate(ids):
        rec = out[k * 48 : k * 48 + 48]
        assert rec[:32] == block_id
        pos = pure.index_find(data, starts, 8, block_id)
        assert rec == (block_id + data[pos + 16 : pos + 32] if pos >= 0 else block_id + bytes(16))
    assert impl.index_locate(data, starts, 8, blob, out) == 0  # found ones are not looked up again
    with pytest.raises(ValueError):
        impl.index_locate(data, starts, 8, blob, bytearray(10))
