"""One conformance suite for every backend (restic's suite.go idea).

The in-memory fake and the filesystem backend always run; object-store backends join the
parametrization when their emulators are available.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest

from pgvault.backends.base import Backend, ObjectNotFound
from pgvault.backends.fs import FsBackend
from pgvault.backends.memory import MemoryBackend
from pgvault.errors import NotFoundError


@pytest.fixture(params=["memory", "fs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
    else:
        yield FsBackend(tmp_path / "repo")


def test_put_get_roundtrip(backend: Backend) -> None:
    backend.put("a/b/c", b"hello")
    assert backend.get("a/b/c") == b"hello"
    backend.put("a/b/c", b"replaced")
    assert backend.get("a/b/c") == b"replaced"


def test_get_missing_is_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("nope")
    with pytest.raises(NotFoundError):
        backend.get_range("nope", 0, 1)
    assert backend.stat("nope") is None


def test_put_if_absent_never_overwrites(backend: Backend) -> None:
    assert backend.put_if_absent("k", b"first") is True
    assert backend.put_if_absent("k", b"second") is False
    assert backend.get("k") == b"first"


def test_put_if_absent_race_has_one_winner(backend: Backend) -> None:
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        wins.append(backend.put_if_absent("race", str(i).encode()))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_ranged_get(backend: Backend) -> None:
    data = bytes(range(256)) * 10
    backend.put("r", data)
    assert backend.get_range("r", 10, 20) == data[10:30]
    assert backend.get_range("r", len(data) - 5, 100) == data[-5:]


def test_stat_and_list(backend: Backend) -> None:
    for i in range(150):
        backend.put(f"dir/sub/{i:04d}", b"x" * i)
    backend.put("dir/other", b"y")
    backend.put("elsewhere", b"z")
    listed = list(backend.list("dir/sub/"))
    assert [o.key for o in listed] == [f"dir/sub/{i:04d}" for i in range(150)]
    assert listed[7].size == 7
    assert [o.key for o in backend.list("dir/sub/001")] == [f"dir/sub/{i:04d}" for i in range(10, 20)]
    assert [o.key for o in backend.list("dir/o")] == ["dir/other"]
    stat = backend.stat("dir/sub/0042")
    assert stat is not None and stat.size == 42
    assert list(backend.list("missing/")) == []


def test_delete_is_idempotent(backend: Backend) -> None:
    backend.put("d", b"1")
    backend.delete("d")
    backend.delete("d")
    assert backend.stat("d") is None


def test_fs_leaves_no_temp_files(tmp_path: Path) -> None:
    backend = FsBackend(tmp_path)
    backend.put("x/y", b"1")
    backend.put_if_absent("x/y", b"2")
    backend.put_if_absent("x/z", b"3")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y", "z"]
