"""Compression dictionaries and delta block lists, through BlockStore and Repository."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pgvault.backends.memory import MemoryBackend
from pgvault.errors import IntegrityError
from pgvault.pipeline import codecs, envelope
from pgvault.pipeline.codecs import Codec
from pgvault.pipeline.pool import OrderedPool
from pgvault.repository import blockstore
from pgvault.repository.blockstore import BlockStore, FileBuilder
from pgvault.repository.manifest import FileEntry, Manifest
from pgvault.repository.repository import Repository, RepoSettings, apply_delta, encode_delta

BLOCK = 8192


def page_like(rnd: random.Random, n: int) -> bytes:
    """Blocks that share structure (as heap pages do) but differ in detail."""
    out = bytearray()
    for _ in range(n):
        rows = b"".join(b"%08d|%s|" % (rnd.randrange(10**8), b"x" * rnd.randrange(20, 90)) for _ in range(80))
        out += (b"\x00\x01PAGEHDR" + rows)[:BLOCK].ljust(BLOCK, b" ")
    return bytes(out)


def store_file(repo: Repository, content: bytes, previous: Manifest | None = None) -> FileEntry:
    entry = FileEntry(path="base/1/1234", type="f", mode=0o600, size=len(content))
    with OrderedPool[Any](2, 16) as pool:
        store = BlockStore(repo, pool, Codec.ZSTD, None)
        store.use_blocklist_bases(previous)
        builder = FileBuilder(store, entry)
        builder.write(memoryview(content))
        builder.close()
        store.finish()
    return entry


def manifest_of(entry: FileEntry) -> Manifest:
    return Manifest("20260101-000000F", "a", "full", "", "", "0/0", "0/0", 1, 1, "", "", 150000, "1", 1 << 24,
                    BLOCK, files=[entry])


@pytest.fixture(params=[None, b"secret"], ids=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Repository:
    monkeypatch.setattr(blockstore, "SAMPLE_BYTES", 64 * BLOCK)
    monkeypatch.setattr(blockstore, "EARLY_SAMPLE_BYTES", 64 * BLOCK)
    return Repository.create(MemoryBackend(), request.param, RepoSettings(BLOCK, 1 << 20))


def test_dictionary_is_trained_stored_sealed_and_used(repo: Repository) -> None:
    content = page_like(random.Random(1), 1200)
    entry = store_file(repo, content)
    keys = sorted(i.key for i in repo.backend.list("dicts/"))
    assert len(keys) == 2  # the early one this backup used, and one from a sample of all of it
    assert all(repo.backend.get(key)[:4] == b"PGVO" for key in keys)  # sealed like every other object
    latest = repo.current_dictionary()
    assert latest is not None and keys[-1].endswith(f"-{latest.dict_id():08x}")
    fresh = Repository.open(repo.backend, b"secret" if repo.keys.encrypted else None)
    assert b"".join(fresh.read_blocks(fresh.file_block_ids(entry))) == content
    codecs_used = set()
    for block_id in fresh.file_block_ids(entry):
        loc = fresh.index.get(block_id)
        assert loc is not None
        codecs_used.add(fresh.backend.get_range(f"packs/{loc.pack[:2]}/{loc.pack}", loc.offset, 16)[6])
    assert codecs_used == {Codec.ZSTD, Codec.ZSTD_DICT}  # before and after training
    # A later backup compresses with the stored dictionary from its first block.
    other = page_like(random.Random(2), 40)
    entry2 = store_file(fresh, other)
    assert b"".join(fresh.read_blocks(fresh.file_block_ids(entry2))) == other


def test_a_block_whose_dictionary_is_gone_fails_clearly(repo: Repository) -> None:
    store_file(repo, page_like(random.Random(1), 1200))
    zdict = repo.current_dictionary()
    assert zdict is not None
    sealed = envelope.seal(repo.keys, envelope.Kind.BLOCK, b"abc" * 1000, b"id", Codec.ZSTD, zdict=zdict)
    with pytest.raises(IntegrityError, match="dictionary"):
        envelope.open_(repo.keys, sealed, b"id", envelope.Kind.BLOCK)
    assert envelope.open_(repo.keys, sealed, b"id", envelope.Kind.BLOCK, repo.dictionary) == b"abc" * 1000
    for info in repo.backend.list("dicts/"):
        repo.backend.delete(info.key)
    fresh = Repository.open(repo.backend, b"secret" if repo.keys.encrypted else None)
    with pytest.raises(IntegrityError, match="dictionary .* is missing"):
        envelope.open_(fresh.keys, sealed, b"id", envelope.Kind.BLOCK, fresh.dictionary)


def test_changed_file_stores_a_delta_block_list(repo: Repository) -> None:
    rnd = random.Random(5)
    content = bytearray(rnd.randbytes(300 * BLOCK))
    first = store_file(repo, bytes(content))
    assert first.blocklist is not None and first.blocklist_base is None
    for blkno in (3, 150, 299):
        content[blkno * BLOCK : blkno * BLOCK + 10] = b"changed!!!"
    content += rnd.randbytes(2 * BLOCK)  # grown by two blocks
    second = store_file(repo, bytes(content), manifest_of(first))
    assert second.blocklist_base == first.blocklist
    assert len(repo.read_block(bytes.fromhex(second.blocklist or ""))) == 8 + 5 * 36
    assert b"".join(repo.read_blocks(repo.file_block_ids(second))) == bytes(content)
    # The next delta is against the same plain base, never a delta of a delta.
    content[0:4] = b"more"
    third = store_file(repo, bytes(content), manifest_of(second))
    assert third.blocklist_base == first.blocklist
    assert b"".join(repo.read_blocks(repo.file_block_ids(third))) == bytes(content)
    # A mostly rewritten file stores a plain list again.
    rewritten = rnd.randbytes(300 * BLOCK)
    fourth = store_file(repo, rewritten, manifest_of(third))
    assert fourth.blocklist_base is None


def test_delta_encoding_round_trips_and_rejects_damage() -> None:
    rnd = random.Random(9)
    base = [rnd.randbytes(32) for _ in range(50)]
    for ids in (base[:20], base + [rnd.randbytes(32)], [rnd.randbytes(32) if i % 7 == 0 else b for i, b in enumerate(base)]):
        assert apply_delta(base, encode_delta(b"".join(base), b"".join(ids))) == ids
    grown = base + [rnd.randbytes(32)]
    delta = encode_delta(b"".join(base), b"".join(grown))
    with pytest.raises(IntegrityError):
        apply_delta(base, delta[:-1])
    with pytest.raises(IntegrityError):
        apply_delta(base, delta[:8])  # says 51 blocks, names none beyond the base


def test_codec_without_dictionary_keeps_plain_zstd() -> None:
    used, _ = codecs.compress(Codec.ZSTD_DICT, b"a" * 1000)
    assert used == Codec.ZSTD


def index_like(rnd: random.Random, n: int) -> bytes:
    """Pages with special space (pd_lower < pd_upper <= pd_special < 8192), as B-tree pages have."""
    out = bytearray()
    for _ in range(n):
        page = bytearray(BLOCK)
        page[12:18] = (24 + 4 * 300).to_bytes(2, "little") + (BLOCK - 16 - 16 * 300).to_bytes(2, "little") + (BLOCK - 16).to_bytes(2, "little")
        for i in range(300):
            key = rnd.randrange(10**6)
            page[BLOCK - 16 - 16 * (i + 1) : BLOCK - 16 * (i + 1)] = key.to_bytes(8, "little") + b"\x10\x00\x02\x00\x00\x00\x00\x00"
        out += page
    return bytes(out)


def test_pages_with_special_space_get_a_dictionary_of_their_own(repo: Repository) -> None:
    rnd = random.Random(3)
    content = page_like(rnd, 600) + index_like(rnd, 600)
    entry = store_file(repo, content)
    keys = [i.key for i in repo.backend.list("dicts/")]
    special = [k for k in keys if "-s-" in k]
    assert len(special) == 2 and len(keys) == 4  # early and final, for each class
    general, index_dict = repo.current_dictionary(), repo.current_dictionary("s")
    assert general is not None and index_dict is not None
    assert special[-1].endswith(f"-{index_dict.dict_id():08x}") and general.dict_id() != index_dict.dict_id()
    fresh = Repository.open(repo.backend, b"secret" if repo.keys.encrypted else None)
    assert b"".join(fresh.read_blocks(fresh.file_block_ids(entry))) == content
    # A later backup compresses such pages with the special class's newest dictionary.
    other = index_like(rnd, 3)
    entry2 = store_file(fresh, other)
    for block_id in fresh.file_block_ids(entry2):
        loc = fresh.index.get(block_id)
        assert loc is not None
        header = fresh.backend.get_range(f"packs/{loc.pack[:2]}/{loc.pack}", loc.offset, 64)
        assert header[6] == Codec.ZSTD_DICT
        if not fresh.keys.encrypted:  # the frame header is readable in plain repositories
            assert codecs.frame_dict_id(header[16:]) == index_dict.dict_id()
    assert b"".join(fresh.read_blocks(fresh.file_block_ids(entry2))) == other


def test_page_class_and_dictionary_keys() -> None:
    from pgvault.repository import layout

    rnd = random.Random(4)
    assert blockstore.page_class(index_like(rnd, 1)) == "s"
    assert blockstore.page_class(page_like(rnd, 1)) == ""
    assert blockstore.page_class(bytes(BLOCK)) == ""  # a new, all-zero page
    assert blockstore.page_class(b"short") == ""
    assert layout.dict_class(layout.dict_key(5, 0x9000)) == ""  # keys written before classes
    assert layout.dict_class(layout.dict_key(5, 0x9000, "s")) == "s"
    assert layout.dict_key(5, 0x9000, "s").rsplit("-", 1)[1] == "00009000"  # what readers parse


def test_offer_many_samples_what_offer_would() -> None:
    """A chunk's blocks offered at once keep the same samples, in the same order, as offered
    one by one (same random choices), and hand over the early sample at the same point."""
    from pgvault.repository.blockstore import _Sampler

    rng = random.Random(3)
    blocks = [rng.randbytes(64) for _ in range(3000)]
    one, many = _Sampler(40, 25), _Sampler(40, 25)
    one._random.seed(11)
    many._random.seed(11)
    pos, early_one, early_many = 0, [], []
    while pos < len(blocks):
        chunk = blocks[pos : pos + rng.randrange(1, 40)]
        pos += len(chunk)
        indices = sorted(rng.sample(range(len(chunk)), rng.randrange(0, len(chunk) + 1)))
        for i in indices:
            if (got := one.offer(chunk[i], early=True)) is not None:
                early_one.append(got)
        if (got := many.offer_many(memoryview(b"".join(chunk)), 64, indices, early=True)) is not None:
            early_many.append(got)
    assert one.seen == many.seen > 1000
    assert one.reservoir == many.reservoir and len(one.reservoir) == 40
    assert early_one == early_many and len(early_one) == 1
