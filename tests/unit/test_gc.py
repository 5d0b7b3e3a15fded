"""Garbage collection on synthetic repositories: what it frees, what it keeps, and that a crash
after any number of backend writes leaves a repository that verifies and restores."""

from __future__ import annotations

import pytest

from pgvault.backends.base import ObjectInfo
from pgvault.backends.memory import MemoryBackend
from pgvault.errors import IntegrityError
from pgvault.repository import gc, layout
from pgvault.repository.repository import Repository
from tests.unit.synthetic import data, new_repo, restore_all, run_verify, write_backup


class Crash(Exception):
    """The simulated kill."""


class CrashingBackend:
    """Passes every call through, and raises Crash at the n-th write or delete: a process
    killed between two backend operations (each operation itself is atomic, as on every backend)."""

    def __init__(self, inner: MemoryBackend, crash_at: int) -> None:
        self.inner = inner
        self.properties = inner.properties
        self.crash_at = crash_at
        self.writes = 0

    def _count(self) -> None:
        if self.writes == self.crash_at:
            raise Crash(f"killed before write {self.writes}")
        self.writes += 1

    def put(self, key: str, data: bytes | bytearray) -> None:
        self._count()
        self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self._count()
        return self.inner.put_if_absent(key, data)

    def delete(self, key: str) -> None:
        self._count()
        self.inner.delete(key)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(key, offset, length)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def list(self, prefix: str):  # type: ignore[no-untyped-def]
        return self.inner.list(prefix)

    def describe(self) -> str:
        return "crashing://"


def shared_repository() -> tuple[MemoryBackend, Repository]:
    """Two stanzas sharing blocks (a clone), several backups each; then some backups deleted."""
    backend = MemoryBackend()
    repo = new_repo(backend, stanzas=("primary", "clone"))
    base = {"base/1": data(1, 40_000), "base/2": data(2, 70_000), "small": data(3, 100)}
    write_backup(repo, "primary", "20260101-000000F", base, (1, 2))
    changed = {**base, "base/2": data(2, 70_000)[:30_000] + data(20, 40_000), "new": data(4, 90_000)}
    write_backup(repo, "primary", "20260102-000000F", changed, (3, 3))
    write_backup(repo, "clone", "20260101-000000F", {**base, "clone-only": data(5, 60_000)}, (1, 1))
    # Keeps a third of the file "new" that only the expired backup wrote: its packs become part live.
    later = {"base/1": data(1, 40_000), "other": data(6, 30_000), "new": data(4, 90_000)[:28_672]}
    write_backup(repo, "primary", "20260103-000000F", later, (4, 5))
    return backend, repo


def expire_two(repo: Repository) -> None:
    repo.delete_backup("primary", "20260102-000000F")
    repo.delete_backup("clone", "20260101-000000F")


def clone(backend: MemoryBackend) -> MemoryBackend:
    twin = MemoryBackend()
    for info in backend.list(""):
        twin.put(info.key, backend.get(info.key))
    return twin


def pack_count(backend: MemoryBackend) -> int:
    return sum(1 for _ in backend.list("packs/"))


def test_gc_frees_dead_packs_and_keeps_everything_live() -> None:
    backend, repo = shared_repository()
    expire_two(repo)
    before = restore_all(repo)
    packs_before = pack_count(backend)
    result = gc.collect(repo, None)
    assert result.packs_deleted + result.packs_repacked > 0 and result.bytes_freed > 0
    assert pack_count(backend) < packs_before
    assert restore_all(repo) == before
    assert run_verify(repo).ok
    # A second collection finds nothing more to do.
    again = gc.collect(repo, None)
    assert again.packs_deleted == again.packs_repacked == again.packs_orphaned == 0


def test_gc_repacks_mostly_dead_packs() -> None:
    backend, repo = shared_repository()
    expire_two(repo)
    result = gc.collect(repo, None, repack_below=0.99)
    assert result.packs_repacked > 0 and result.blocks_copied > 0
    live = gc.mark(repo)
    # Every remaining pack holds only live blocks now.
    for pack, entries in repo.pack_indexes().items():
        assert all(block_id in live for block_id, _, _ in entries), pack
    assert run_verify(repo).ok


def test_gc_dry_run_changes_nothing() -> None:
    backend, repo = shared_repository()
    expire_two(repo)
    snapshot = dict(backend._objects)
    result = gc.collect(repo, None, dry_run=True, repack_below=0.9)
    assert result.bytes_freed > 0
    assert backend._objects == snapshot


def test_gc_removes_orphan_packs_of_a_killed_backup() -> None:
    backend, repo = shared_repository()
    # A backup killed after writing pack, index, pack (before the second index object).
    crashing = CrashingBackend(backend, crash_at=3)
    dead = Repository(crashing, repo.keys, repo.settings)  # type: ignore[arg-type]
    with pytest.raises(Crash):
        write_backup(dead, "primary", "20260104-000000F", {"huge": data(9, 200_000)}, (6, 6))
    assert repo.list_backups("primary")[-1] == "20260103-000000F"
    # And a pack whose index object never got written.
    backend.put(layout.pack_key("ab" * 16), b"half a pack")
    result = gc.collect(repo, None)
    assert result.packs_orphaned == 2 and result.packs_deleted == 1
    assert run_verify(repo).ok


def test_gc_refuses_when_a_needed_pack_is_missing() -> None:
    backend, repo = shared_repository()
    live = gc.mark(repo)
    pack = next(p for p, entries in repo.pack_indexes().items() if any(e[0] in live for e in entries))
    backend.delete(layout.pack_key(pack))
    snapshot = dict(backend._objects)
    with pytest.raises(IntegrityError, match="missing"):
        gc.collect(repo, None)
    assert backend._objects == snapshot


def test_gc_crash_at_every_write_leaves_a_valid_repository() -> None:
    backend, repo = shared_repository()
    expire_two(repo)
    expected = restore_all(repo)
    # Count the writes of an uninterrupted run on a copy.
    probe = CrashingBackend(clone(backend), crash_at=-1)
    planned = gc.collect(Repository(probe, repo.keys, repo.settings), None, repack_below=0.9)  # type: ignore[arg-type]
    total = probe.writes
    # New packs with their index objects, then old index objects, then old packs.
    assert planned.packs_written >= 1 and planned.packs_deleted >= 1 and total >= 8
    for crash_at in range(total):
        victim = clone(backend)
        crashing = CrashingBackend(victim, crash_at)
        with pytest.raises(Crash):
            gc.collect(Repository(crashing, repo.keys, repo.settings), None, repack_below=0.9)  # type: ignore[arg-type]
        after = Repository(victim, repo.keys, repo.settings)
        assert restore_all(after) == expected, crash_at
        report = run_verify(after)
        assert report.ok, (crash_at, report.faults, [b.faults for b in report.backups])
        # The next run finishes the job.
        gc.collect(after, None, repack_below=0.9)
        assert restore_all(after) == expected
        assert gc.collect(after, None, repack_below=0.9).packs_deleted == 0


def test_gc_on_encrypted_repository() -> None:
    backend = MemoryBackend()
    repo = new_repo(backend, passphrase=b"secret", stanzas=("s",))
    write_backup(repo, "s", "20260101-000000F", {"f": data(1, 50_000)}, (1, 1))
    write_backup(repo, "s", "20260102-000000F", {"f": data(2, 50_000)}, (2, 2))
    repo.delete_backup("s", "20260101-000000F")
    expected = restore_all(repo)
    assert gc.collect(repo, None).bytes_freed > 40_000
    assert restore_all(repo) == expected
    assert run_verify(repo).ok


def test_max_unused_bounds_the_dead_bytes_left_in_packs() -> None:
    backend, repo = shared_repository()
    expire_two(repo)
    lenient = gc.collect(repo, None, dry_run=True, repack_below=0.0, max_unused=1.0)
    assert lenient.packs_repacked == 0 and lenient.bytes_unused > 0
    strict = gc.collect(repo, None, repack_below=0.0, max_unused=0.0)
    assert strict.packs_repacked > 0 and strict.bytes_unused == 0
    live = gc.mark(repo)
    assert all(e[0] in live for entries in repo.pack_indexes().values() for e in entries)
    assert run_verify(repo).ok


def test_gc_removes_temp_files_of_killed_writers_on_the_filesystem(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A backup killed while a pack streams into its temp file leaves the file behind, invisible
    to list(): GC (under the exclusive lock) removes it at any age, and other temp files (a
    wal-push may be writing one without a lock) only once they are TEMP_STALE old."""
    import os
    import time

    from pgvault.backends.fs import FsBackend

    backend = FsBackend(tmp_path / "repo")
    repo = new_repo(backend)
    write_backup(repo, "a", "20260101-000000F", {"base/1": data(1, 40_000)}, (1, 2))
    before = restore_all(repo)
    killed = backend.open_upload(layout.pack_key("cd" * 16))  # the kill: never committed or aborted
    killed.write(b"x" * 100_000)
    fresh = backend._path("wal/fresh").parent / ".tmp.fresh.1"
    stale = backend._path("wal/stale").parent / ".tmp.stale.1"
    for path in (fresh, stale):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"segment being written")
    old = time.time() - gc.TEMP_STALE - 60
    os.utime(stale, (old, old))

    assert gc.collect(repo, None, dry_run=True).temp_deleted == 0  # a dry run deletes nothing
    result = gc.collect(repo, None)

    leftovers = sorted(p.name for p in (tmp_path / "repo").rglob(".tmp.*"))
    assert result.temp_deleted == 2
    assert leftovers == [fresh.name]
    assert run_verify(repo).ok and restore_all(repo) == before
