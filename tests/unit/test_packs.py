"""PackWriter: packs written in the background are found while in flight, and errors surface."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pgvault.backends.memory import MemoryBackend
from pgvault.errors import BackendError
from pgvault.pipeline import envelope
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


def _batch(blocks: list[tuple[bytes, bytes]]) -> tuple[bytes, list[int], bytes, bytes]:
    """A chunk as BlockStore.submit_chunk hands it to add_many: every block new."""
    ends, end = [], 0
    for _, sealed in blocks:
        end += len(sealed)
        ends.append(end)
    ids = b"".join(block_id for block_id, _ in blocks)
    return ids, list(range(len(blocks))), b"".join(s for _, s in blocks), struct.pack(f"<{len(ends)}Q", *ends)


def _pack_contents(backend: MemoryBackend, keys: Keys) -> list[list[tuple[bytes, bytes]]]:
    """Each pack's (id, sealed bytes) in order, read back through its trailer (packs sorted:
    their names are random)."""
    from pgvault.repository.index import ENTRY, decode_body

    packs = []
    for key in (info.key for info in backend.list("packs/")):
        data = backend.get(key)
        (length,) = struct.unpack_from("<I", data, len(data) - 8)
        trailer = data[len(data) - 8 - length : len(data) - 8]
        _, body = decode_body(envelope.open_(keys, trailer, key.rsplit("/", 1)[1].encode(), envelope.Kind.PACK_TRAILER))
        packs.append([(bytes(block_id), data[off : off + n]) for block_id, off, n in ENTRY.iter_unpack(body)])
    return sorted(packs)


def test_add_many_stores_what_add_would() -> None:
    """Same packs, same records, same bytes as add(index_checked=True) one block at a time,
    with chunks checked by lacking() (the workers) a few chunks before they are added, as in a
    backup: copies within a chunk and blocks an earlier chunk added meanwhile are skipped,
    packs fill mid-chunk."""
    rng = random.Random(7)
    keys = Keys(None, os.urandom(32))
    known = [os.urandom(32) for _ in range(3)]
    pool = [os.urandom(32) for _ in range(40)]
    chunks = []
    for _ in range(60):
        blocks = []
        for _ in range(rng.randrange(0, 9)):
            block_id = rng.choice(pool + known)
            blocks.append((block_id, block_id[:4] * rng.randrange(1, 60)))
        chunks.append(blocks)
    results = []
    for mode in ("add", "add_many"):
        backend, index = MemoryBackend(), Index()
        index.add_pack("0" * 32, [(block_id, 0, 1) for block_id in known])
        # Packs finished inline: with the writer thread, whether a block a finished pack holds is
        # stored again (harmless, see add) would depend on its timing.
        writer = PackWriter(backend, keys, index, target_size=700)
        in_flight: list[list[tuple[bytes, bytes]]] = []
        appended = []
        for step in range(len(chunks) + 3):
            if step < len(chunks):  # a worker seals what lacking() says is new
                ids = b"".join(block_id for block_id, _ in chunks[step])
                in_flight.append([chunks[step][k] for k in writer.lacking(ids)])
            if step >= 3 or step >= len(chunks):  # the oldest chunk is done
                blocks = in_flight.pop(0)
                if mode == "add":
                    appended.append(sum(writer.add(block_id, sealed, True) for block_id, sealed in blocks))
                else:
                    appended.append(writer.add_many(*_batch(blocks)))
        writer.flush()
        writer.wait()
        results.append((appended, _pack_contents(backend, keys), writer.packs_written))
    assert results[0] == results[1]
    assert results[0][2] > 3  # packs filled (and were flushed) in the middle of chunks


def test_a_large_object_is_written_through_in_its_place() -> None:
    """add() writes an object of WRITE_BUFFER or more (a 1 GiB file's 4 MiB block list)
    straight to the upload, after what is buffered, instead of copying it into the buffer:
    the pack holds every object where its record says."""
    from pgvault.repository.packs import WRITE_BUFFER

    keys = Keys(None, os.urandom(32))
    backend = MemoryBackend()
    writer = PackWriter(backend, keys, Index(), target_size=64 << 20)
    objects = [(os.urandom(32), os.urandom(n)) for n in (100, 5000, WRITE_BUFFER + 7, 300, 4 * WRITE_BUFFER, 1)]
    for block_id, sealed in objects:
        assert writer.add(block_id, sealed)
    writer.flush()
    writer.wait()
    assert _pack_contents(backend, keys) == [objects]
