"""The write path's native seal_blocks against its pure twin and against the envelope:
identical bytes (plain repositories; encrypted ones differ only in their random nonces), and
every object opens with envelope.open_ and with open_blocks, for every codec and page class."""

from __future__ import annotations

import random
import struct
from types import ModuleType

import pytest
import zstandard

from pgvault import _pure as pure
from pgvault.pipeline import codecs, crypto, envelope
from pgvault.pipeline.envelope import Kind
from pgvault.repository.blockstore import SPECIAL_CLASS, page_class
from tests.native.impls import IMPLS, native, requires_native

REF = struct.Struct("<32sQII")
BLOCK = 8192


def _page(rnd: random.Random, special: bool) -> bytes:
    """A PostgreSQL-like page: header with pd_lower/pd_upper/pd_special, compressible body."""
    lower, upper = 24 + 4 * rnd.randrange(1, 60), 4096 + 8 * rnd.randrange(0, 100)
    header = bytearray(24)
    struct.pack_into("<HHH", header, 12, lower, upper, 8176 if special else 8192)
    body = (bytes(range(256)) * 32)[: BLOCK - 24 - 64] + rnd.randbytes(64)
    return bytes(header) + body


def _chunk(rnd: random.Random, blocks: int, short: int = 0) -> bytes:
    """Pages of both classes, zero pages, incompressible blocks; a short last block if asked."""
    parts = []
    for _ in range(blocks):
        kind = rnd.randrange(4)
        parts.append(_page(rnd, kind == 1) if kind < 2 else bytes(BLOCK) if kind == 2 else rnd.randbytes(BLOCK))
    if short:
        parts.append(rnd.randbytes(short // 2) + bytes(short - short // 2))
    return b"".join(parts)


def _zdict(rnd: random.Random, special: bool) -> zstandard.ZstdCompressionDict:
    samples = [_page(rnd, special) for _ in range(300)]
    return zstandard.train_dictionary(4096, samples, dict_id=40000 + rnd.randrange(10000), level=1)


@pytest.fixture(params=["plain", "encrypted"])
def keys(request: pytest.FixtureRequest) -> crypto.Keys:
    return crypto.new_keys(None if request.param == "plain" else b"pw")[0]


def _split(out: bytes, ends: bytes) -> list[bytes]:
    offsets = [0, *struct.unpack(f"<{len(ends) // 8}Q", ends)]
    return [out[a:b] for a, b in zip(offsets, offsets[1:])]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("codec", [codecs.Codec.ZSTD, codecs.Codec.LZ4, codecs.Codec.NONE])
@pytest.mark.parametrize("dicts", ["none", "plain", "both"])
def test_seal_blocks_opens_as_envelopes(impl: ModuleType, keys: crypto.Keys, codec: codecs.Codec, dicts: str) -> None:
    rnd = random.Random(f"{codec}{dicts}")
    data = _chunk(rnd, 32, short=rnd.choice([0, 100, 5000]))
    count = -(-len(data) // BLOCK)
    ids = b"".join(keys.block_id(data[i * BLOCK : (i + 1) * BLOCK]) for i in range(count))
    zplain = _zdict(rnd, False) if dicts != "none" else None
    zspecial = _zdict(rnd, True) if dicts == "both" else None
    members = sorted(rnd.sample(range(count), count * 2 // 3))
    out, ends, classes = impl.seal_blocks(memoryview(data), BLOCK, ids, members, Kind.BLOCK, codec, 1, (zplain, zspecial), keys.data_key)
    objs = _split(out, ends)
    assert len(objs) == len(members) == len(classes)
    by_id = {z.dict_id(): z for z in (zplain, zspecial) if z is not None}
    used = set()
    for i, obj, cls in zip(members, objs, classes):
        block = data[i * BLOCK : (i + 1) * BLOCK]
        context = ids[i * 32 : i * 32 + 32]
        assert cls == (page_class(block) == SPECIAL_CLASS)
        assert envelope.open_(keys, obj, context, Kind.BLOCK, dicts=by_id.__getitem__) == block
        used.add(obj[6])
        if obj[6] == codecs.Codec.NONE and not keys.encrypted:
            assert obj[16 : 16 + len(block)] == block  # stored as is
        zdict = (zspecial if cls else zplain) if codec == codecs.Codec.ZSTD else None
        if not keys.encrypted:
            # byte for byte what the envelope makes for that block
            assert obj == envelope.seal(keys, Kind.BLOCK, block, context, codec, 1, zdict)
    if codec == codecs.Codec.ZSTD and dicts == "both":
        assert {codecs.Codec.ZSTD_DICT, codecs.Codec.NONE} <= used
    # the read path's exact inverse: one pack of them opens with open_blocks
    refs = bytearray()
    pos = 0
    for i, obj in zip(members, objs):
        refs += REF.pack(ids[i * 32 : i * 32 + 32], pos, len(obj), 0)
        pos += len(obj)
    plain, _, faults = impl.open_blocks(out, 0, bytes(refs), 0, len(members), keys.data_key, Kind.BLOCK, by_id.__getitem__, True)
    assert faults == []
    assert plain == b"".join(data[i * BLOCK : (i + 1) * BLOCK] for i in members)


@requires_native
@pytest.mark.parametrize("codec", [codecs.Codec.ZSTD, codecs.Codec.LZ4, codecs.Codec.NONE])
def test_seal_blocks_native_equals_pure(keys: crypto.Keys, codec: codecs.Codec) -> None:
    """Identical output (apart from the nonces of encrypted objects) on random chunks."""
    assert native is not None
    rnd = random.Random(int(codec))
    zdicts = (_zdict(rnd, False), _zdict(rnd, True))
    for trial in range(12):
        data = _chunk(rnd, rnd.randrange(1, 40), short=rnd.choice([0, 0, 1, 4000]))
        count = -(-len(data) // BLOCK)
        ids = rnd.randbytes(32 * count)
        members = sorted(rnd.sample(range(count), rnd.randrange(0, count + 1)))
        args = (BLOCK, ids, members, Kind.BLOCK, codec, 1, zdicts if trial % 2 else (None, zdicts[1]), keys.data_key)
        n_out, n_ends, n_classes = native.seal_blocks(data, *args)
        p_out, p_ends, p_classes = pure.seal_blocks(data, *args)
        assert (n_ends, n_classes) == (p_ends, p_classes)
        if not keys.encrypted:
            assert n_out == p_out
        else:
            for a, b in zip(_split(n_out, n_ends), _split(p_out, p_ends)):
                assert a[:16] == b[:16] and len(a) == len(b) and a[16:40] != b[16:40]


@pytest.mark.parametrize("impl", IMPLS)
def test_seal_blocks_rejects_bad_arguments(impl: ModuleType) -> None:
    data = bytes(3 * BLOCK)
    ids = bytes(96)
    with pytest.raises(ValueError):
        impl.seal_blocks(data, BLOCK, ids[:64], [0], Kind.BLOCK, 1, 1, (None, None), None)
    with pytest.raises(ValueError):
        impl.seal_blocks(data, BLOCK, ids, [3], Kind.BLOCK, 1, 1, (None, None), None)
    with pytest.raises(ValueError):
        impl.seal_blocks(data, BLOCK, ids, [0], Kind.BLOCK, 9, 1, (None, None), None)
    with pytest.raises(ValueError):
        impl.seal_blocks(data, BLOCK, ids, [0], Kind.BLOCK, 1, 1, (None, None), b"short key")
    assert impl.seal_blocks(data, BLOCK, ids, [], Kind.BLOCK, 1, 1, (None, None), None) == (b"", b"", b"")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, 32 * BLOCK])
def test_block_ids_are_keyed_blake3(impl: ModuleType, length: int) -> None:
    """The ids Keys.block_id gives (the repository format), for whole and short blocks."""
    keys = crypto.new_keys(None)[0]
    rnd = random.Random(length)
    data = rnd.randbytes(length)
    expect = b"".join(keys.block_id(data[pos : pos + BLOCK]) for pos in range(0, length, BLOCK))
    assert impl.block_ids(memoryview(data), BLOCK, keys.id_key) == expect
    assert impl.block_ids(data, 1000, keys.id_key) == b"".join(keys.block_id(data[p : p + 1000]) for p in range(0, length, 1000))


@pytest.mark.parametrize("impl", IMPLS)
def test_block_ids_rejects_bad_arguments(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.block_ids(bytes(10), 0, bytes(32))
    with pytest.raises(ValueError):
        impl.block_ids(bytes(10), BLOCK, bytes(31))


@requires_native
def test_block_ids_native_without_the_gil() -> None:
    """This build computes ids with BLAKE3's C code (setup.py finds librust-blake3-dev)."""
    assert native is not None and native.BLAKE3_NATIVE
