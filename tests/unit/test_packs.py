"""PackWriter: packs written in the background are found while in flight, and errors surface."""

from __future__ import annotations

import os

import pytest

from pgvault.backends.memory import MemoryBackend
from pgvault.errors import BackendError
from pgvault.pipeline.crypto import Keys
from pgvault.repository.index import Index
from pgvault.repository.packs import PackWriter


def test_background_flush_keeps_blocks_visible_and_indexed() -> None:
    backend, index = MemoryBackend(), Index()
    writer = PackWriter(backend, Keys(None, os.urandom(32)), index, target_size=1000, background=True)
    ids = [os.urandom(32) for _ in range(10)]
    for block_id in ids:
        writer.add(block_id, b"x" * 300)  # a pack every 4 blocks
        assert writer.has(block_id)
    writer.flush()
    writer.wait()
    assert all(block_id in index for block_id in ids)
    assert writer.packs_written == 3 and len(list(backend.list("packs/"))) == 3
    assert len(list(backend.list("index/"))) == 3


class FailingBackend(MemoryBackend):
    def put(self, key: str, data: bytes | bytearray) -> None:
        if key.startswith("packs/"):
            raise BackendError("disk full")
        super().put(key, data)


def test_a_failed_background_write_raises_at_the_next_flush_or_wait() -> None:
    writer = PackWriter(FailingBackend(), Keys(None, os.urandom(32)), Index(), target_size=100, background=True)
    writer.add(os.urandom(32), b"x" * 200)  # flushed: fails in the background
    with pytest.raises(BackendError, match="disk full"):
        writer.add(os.urandom(32), b"y" * 200)  # its flush waits for the first
    writer2 = PackWriter(FailingBackend(), Keys(None, os.urandom(32)), Index(), target_size=100, background=True)
    writer2.add(os.urandom(32), b"x" * 200)
    with pytest.raises(BackendError, match="disk full"):
        writer2.wait()


def test_fs_packs_stream_to_a_hidden_temp_file_and_abort_removes_it(tmp_path) -> None:
    """On the filesystem a filling pack is on disk, not in memory; a failed backup's abort()
    leaves no file behind, and only finished packs (with their index objects) are visible."""
    from pgvault.backends.fs import FsBackend

    backend, index = FsBackend(tmp_path), Index()
    writer = PackWriter(backend, Keys(None, os.urandom(32)), index, target_size=3 << 20, background=True)
    for _ in range(40):  # 2.5 MiB, past the write buffer: part of the pack is in its temp file
        writer.add(os.urandom(32), os.urandom(64 << 10))
    temps = [p for p in tmp_path.rglob(".tmp.*")]
    assert len(temps) == 1 and temps[0].stat().st_size >= 1 << 20
    assert list(backend.list("")) == []
    writer.abort()
    assert list(tmp_path.rglob(".tmp.*")) == [] and list(backend.list("")) == []

    ids = [os.urandom(32) for _ in range(60)]
    writer = PackWriter(backend, Keys(None, os.urandom(32)), index, target_size=3 << 20, background=True)
    for block_id in ids:
        writer.add(block_id, os.urandom(64 << 10))
    writer.flush()
    writer.wait()
    assert list(tmp_path.rglob(".tmp.*")) == []
    assert writer.packs_written == 2 and all(block_id in index for block_id in ids)
    assert len(list(backend.list("packs/"))) == 2 and len(list(backend.list("index/"))) == 2
