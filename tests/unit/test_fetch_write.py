"""The prefetcher's streaming WAL writer gives byte-for-byte what get_wal gives, or an error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgvault.backends.memory import MemoryBackend
from pgvault.errors import IntegrityError, WalNotFoundError
from pgvault.ops.fetch_async import CHUNK, write_wal
from pgvault.pipeline import codecs
from pgvault.repository import layout
from pgvault.repository.repository import Repository, RepoSettings

SEGMENT = "000000010000000000000003"


def segment_bytes() -> bytes:
    """16 MiB like WAL: compressible records with random payloads, many CHUNKs long."""
    page = b"\x10\xd1" + bytes(22) + os.urandom(1000) + bytes(7168)
    return page * (16 * 1024 * 1024 // len(page)) + bytes(16 * 1024 * 1024 % len(page))


@pytest.fixture(params=[None, b"secret"], ids=["plain", "encrypted"])
def repo(request: pytest.FixtureRequest) -> Repository:
    return Repository.create(MemoryBackend(), request.param, RepoSettings(8192, 1 << 20))


@pytest.mark.parametrize("codec", list(codecs.Codec.__members__.values()))
def test_stream_matches_get_wal(repo: Repository, codec: codecs.Codec, tmp_path: Path) -> None:
    if codec == codecs.Codec.ZSTD_DICT:
        pytest.skip("WAL is never stored with a dictionary")
    data = segment_bytes()
    assert len(data) > 8 * CHUNK
    repo.put_wal("main", SEGMENT, data, codec, None)
    write_wal(repo, "main", SEGMENT, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == repo.get_wal("main", SEGMENT) == data


def test_absent_and_corrupt(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(WalNotFoundError):
        write_wal(repo, "main", SEGMENT, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for an absent file
    repo.put_wal("main", SEGMENT, segment_bytes(), codecs.Codec.ZSTD, 1)
    key = layout.wal_key("main", SEGMENT)
    stored = bytearray(repo.backend.get(key))
    stored[len(stored) // 2] ^= 1
    repo.backend.delete(key)
    repo.backend.put(key, bytes(stored))
    with pytest.raises(IntegrityError):
        write_wal(repo, "main", SEGMENT, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before a byte is written
