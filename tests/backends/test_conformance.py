"""One conformance suite for every backend (restic's suite.go idea).

The in-memory fake and the filesystem backend always run; S3, GCS and Azure run against
emulators on loopback (tests/support/emulators.py), through the same retry wrapper the
registry puts around them, with small multipart thresholds and list pages so a few MiB
exercise multipart/resumable/staged-block uploads and pagination.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import pytest

from pgvault.backends.base import Backend, ObjectInfo, ObjectNotFound, open_upload
from pgvault.backends.fs import FsBackend
from pgvault.backends.memory import MemoryBackend
from pgvault.backends.readahead import ReadAheadBackend
from pgvault.backends.retry import RetryingBackend
from pgvault.errors import NotFoundError
from tests.support.emulators import Cloud, apply_env

# Small enough that LARGE is a multi-part upload on every object store (S3 parts must be
# at least 5 MiB; GCS switches to a resumable upload above 8 MiB).
SMALL_PARTS = {
    "s3": {"multipart_threshold": 6 << 20, "part_size": 5 << 20, "page_size": 40},
    "gcs": {"page_size": 40},
    "azure": {"max_single_put": 1 << 20, "block_size": 1 << 20, "page_size": 40},
}
LARGE = 9 << 20


def make_cloud_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kind: str) -> Backend:
    """Wrapped as the registry wraps it (read-ahead over retry over the SDK backend)."""
    cloud: Cloud = request.getfixturevalue(f"{kind}_cloud_session")
    apply_env(monkeypatch, cloud)
    inner = cloud.backend(cloud.new_bucket(), "some/prefix/", **SMALL_PARTS[kind])
    return ReadAheadBackend(RetryingBackend(inner, timeout=30), window=1 << 20)


@pytest.fixture(params=["memory", "readahead", "fs", "s3", "gcs", "azure"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
    elif request.param == "readahead":
        yield ReadAheadBackend(MemoryBackend(), window=64, windows=3)
    elif request.param == "fs":
        yield FsBackend(tmp_path / "repo")
    else:
        yield make_cloud_backend(request, monkeypatch, request.param)


def is_fake_gcs(backend: Backend) -> bool:
    return "gs://" in backend.describe()


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


def test_upload_is_invisible_until_commit(backend: Backend) -> None:
    """Packs are streamed (open_upload): no reader may see a partial object under its key."""
    upload = open_upload(backend, "packs/ab/streamed")
    upload.write(b"a" * 1000)
    upload.write(memoryview(b"b" * 3000))
    assert backend.stat("packs/ab/streamed") is None
    assert [i.key for i in backend.list("packs/")] == []
    upload.commit()
    assert backend.get("packs/ab/streamed") == b"a" * 1000 + b"b" * 3000


def test_aborted_upload_leaves_nothing(backend: Backend) -> None:
    upload = open_upload(backend, "packs/ab/aborted")
    upload.write(b"x" * 5000)
    upload.abort()
    upload.abort()  # idempotent
    assert backend.stat("packs/ab/aborted") is None
    assert list(backend.list("")) == []


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


def test_large_object_roundtrip_and_ranges(backend: Backend) -> None:
    """Multipart / resumable / staged-block uploads; ranged reads across part boundaries."""
    data = os.urandom(LARGE)
    backend.put("packs/ab/large", data)
    assert backend.get("packs/ab/large") == data
    info = backend.stat("packs/ab/large")
    assert info is not None and info.size == LARGE
    for offset in (0, (5 << 20) - 7, LARGE - 100):
        assert backend.get_range("packs/ab/large", offset, 4096) == data[offset : offset + 4096]
    replacement = os.urandom(LARGE + 1)
    backend.put("packs/ab/large", replacement)
    assert backend.get("packs/ab/large") == replacement


def test_put_if_absent_large_never_overwrites(backend: Backend, request: pytest.FixtureRequest) -> None:
    if is_fake_gcs(backend):
        request.applymarker(pytest.mark.xfail(
            reason="fake-gcs-server ignores ifGenerationMatch=0 on resumable uploads (real GCS answers 412); "
            "the small-object test covers the same code path", strict=True))
    first = os.urandom(LARGE)
    assert backend.put_if_absent("big", first) is True
    assert backend.put_if_absent("big", os.urandom(LARGE)) is False
    assert backend.get("big") == first


def test_range_past_end_and_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.stat("empty") == ObjectInfo("empty", 0)
    backend.put("ten", b"0123456789")
    assert backend.get_range("ten", 10, 5) == b""
    assert backend.get_range("ten", 8, 0) == b""
    with pytest.raises(ObjectNotFound):
        backend.get_range("nope", 10, 5)


def test_keys_stay_under_the_prefix(backend: Backend) -> None:
    """Listing the whole repository shows relative keys only, nothing outside the prefix."""
    backend.put("config", b"c")
    backend.put("wal/main/000000010000000000000001", b"w")
    assert [o.key for o in backend.list("")] == ["config", "wal/main/000000010000000000000001"]


def test_small_ranges_after_replacement_see_new_bytes(backend: Backend) -> None:
    """Read-ahead must never serve bytes of an object that has since been replaced."""
    backend.put("obj", b"a" * 1000)
    assert backend.get_range("obj", 10, 5) == b"aaaaa"
    backend.put("obj", b"b" * 1000)
    assert backend.get_range("obj", 10, 5) == b"bbbbb"
    backend.delete("obj")
    with pytest.raises(ObjectNotFound):
        backend.get_range("obj", 10, 5)


def test_fs_leaves_no_temp_files(tmp_path: Path) -> None:
    backend = FsBackend(tmp_path)
    backend.put("x/y", b"1")
    backend.put_if_absent("x/y", b"2")
    backend.put_if_absent("x/z", b"3")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y", "z"]
