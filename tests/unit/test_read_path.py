"""Repository.read_file / read_chunks / read_blocks (the restore path): content across index
windows, packs and chunks, plain and encrypted; damage fails with the block and pack named."""

from __future__ import annotations

import pytest

from pgvault.errors import IntegrityError
from pgvault.repository import layout
from pgvault.repository.manifest import FileEntry
from pgvault.repository.repository import Repository
from tests.unit.synthetic import BLOCK, data, new_repo, write_backup


def _repo(passphrase: bytes | None) -> tuple[Repository, dict[str, bytes]]:
    repo = new_repo(passphrase=passphrase)
    compressible = b"".join(i.to_bytes(4, "little") * (BLOCK // 4) for i in range(90)) + b"tail"
    files = {"big": data(1, 200 * BLOCK + 123), "zeros": bytes(40 * BLOCK), "text": compressible, "tiny": b"x"}
    write_backup(repo, "a", "20260101-000000F", files, (1, 1))
    repo.forget_index()
    return repo, files


def _entries(repo: Repository) -> dict[str, FileEntry]:
    manifest = repo.load_manifest("a", "20260101-000000F")
    return {e.path: e for e in manifest.files}


@pytest.mark.parametrize("passphrase", [None, b"pw"])
def test_read_file_windows_and_chunks(passphrase: bytes | None) -> None:
    repo, files = _repo(passphrase)
    entries = _entries(repo)
    for locate_ids, chunk in ((8192, 2 << 20), (7, 3 * BLOCK), (1, 1)):
        repo.LOCATE_IDS = locate_ids  # type: ignore[misc]
        repo.CHUNK_BYTES = chunk  # type: ignore[misc]
        for path, content in files.items():
            ids = repo.file_ids(entries[path])
            chunks = list(repo.read_file(ids, BLOCK))
            assert b"".join(chunks) == content
            assert all(len(c) <= max(chunk, BLOCK) for c in chunks)
            assert b"".join(repo.read_blocks(repo.file_block_ids(entries[path]), rehash=True)) == content


def test_damage_names_block_and_pack() -> None:
    repo, files = _repo(None)
    entry = _entries(repo)["big"]
    ids = repo.file_ids(entry)
    loc = repo.index.get(ids[32 * 150 : 32 * 151])
    assert loc is not None
    raw = bytearray(repo.backend.get(layout.pack_key(loc.pack)))
    raw[loc.offset + 40] ^= 1
    repo.backend.put(layout.pack_key(loc.pack), bytes(raw))
    with pytest.raises(IntegrityError, match=f"block {ids[32 * 150 : 32 * 151].hex()} in pack {loc.pack}: object checksum mismatch"):
        b"".join(repo.read_file(ids, BLOCK))
    missing = bytes(32)
    with pytest.raises(IntegrityError, match=f"block {missing.hex()} is missing from the repository index"):
        list(repo.read_file(ids[:64] + missing, BLOCK))


def test_locate_many_counts_what_the_index_lacks() -> None:
    from pgvault.repository.index import RECORD, Index

    empty = Index()
    refs, missing = empty.locate_many(b"\1" * 32 + b"\2" * 32)
    assert missing == 2 and refs == bytearray(b"\1" * 32 + bytes(16) + b"\2" * 32 + bytes(16))
    index = Index()
    index.add_pack("p1", [(b"\3" * 32, 100, 10)])
    index.add_pack("p2", [(b"\4" * 32, 200, 20)])
    refs, missing = index.locate_many(b"\4" * 32 + b"\5" * 32 + b"\3" * 32)
    assert missing == 1
    records = [RECORD.unpack_from(refs, k * RECORD.size) for k in range(3)]
    assert [(index.pack_name(r[3]) if r[2] else None, r[1], r[2]) for r in records] == [("p2", 200, 20), (None, 0, 0), ("p1", 100, 10)]
