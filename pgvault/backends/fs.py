"""Filesystem backend: the embedded default.

Writes are atomic and durable: temp file in the same directory, write, fsync, rename,
fsync the directory. put_if_absent uses link(2), which fails if the target exists, so two
writers racing for one key cannot both win (the same primitive S3's If-None-Match gives).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Iterator

from pgvault.backends.base import ObjectInfo, ObjectNotFound, Properties
from pgvault.durable import fsync_dir, write_new
from pgvault.errors import BackendError


class FsBackend:
    properties = Properties(atomic_put_if_absent=True, connections=8, local=True)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise BackendError(f"invalid object key {key!r}")
        return self.root / key

    def _open_temp(self, path: Path) -> tuple[Path, int]:
        """A new hidden temp file beside path (list() skips ``.tmp.`` names)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".tmp.{path.name}.{os.urandom(16).hex()}"  # uuid costs 8 ms to import
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise BackendError(f"cannot write {path.relative_to(self.root)} in {self.root}: {exc.strerror}") from None

    def open_upload(self, key: str) -> FsUpload:
        """A pack written to its temp file as it fills, so no pack is held in memory."""
        return FsUpload(self, key)

    def put(self, key: str, data: bytes | bytearray) -> None:
        upload = FsUpload(self, key)
        try:
            upload.write(data)
            upload.commit()
        except BaseException:
            upload.abort()  # interrupted between the two (an OSError has aborted it already)
            raise

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            return write_new(str(path), data)
        except OSError as exc:
            raise BackendError(f"cannot write {key} in {self.root}: {exc.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.root}") from None
        except OSError as exc:
            raise self._unreadable(key, exc) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.root}") from None
        except OSError as exc:
            raise self._unreadable(key, exc) from None
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise self._unreadable(key, exc) from None
        finally:
            os.close(fd)

    def _unreadable(self, key: str, exc: OSError) -> BackendError:
        """Anything but absence is a failure, never 'not found' (wal-fetch depends on it)."""
        return BackendError(f"cannot read {key} in {self.root}: {exc.strerror}")

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            return ObjectInfo(key, self._path(key).stat().st_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._unreadable(key, exc) from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the directory the prefix names, then filter by the rest of the prefix.
        base, _, _ = prefix.rpartition("/")
        start = self.root / base if base else self.root
        if not start.is_dir():
            return iter(())
        found: list[ObjectInfo] = []
        def unlistable(exc: OSError) -> None:  # os.walk would skip the directory silently
            raise BackendError(f"cannot list {exc.filename}: {exc.strerror}")

        for dirpath, dirnames, filenames in os.walk(start, onerror=unlistable):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.startswith(".tmp."):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    try:
                        size = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue
                    found.append(ObjectInfo(key, size))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def sweep_temp(self, prefix: str, older_than: float) -> int:
        """Remove the hidden temp files under the directory prefix names that were last
        written over older_than seconds ago: what a writer killed between creating one and
        renaming it into place left (invisible to list(), but taking space). Returns how many."""
        start = self.root / prefix.rstrip("/") if prefix else self.root
        cutoff = time.time() - older_than
        removed = 0
        for dirpath, _, filenames in os.walk(start):
            for name in filenames:
                if not name.startswith(".tmp."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.stat(path).st_mtime <= cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue  # renamed into place or removed meanwhile
        return removed

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


class FsUpload:
    """An object streamed into a hidden temp file; commit() fsyncs it, renames it into place
    and fsyncs the directory, as put() does, so readers never see a partial object."""

    def __init__(self, backend: FsBackend, key: str) -> None:
        self._backend = backend
        self._key = key
        self._path = backend._path(key)
        self._tmp, self._fd = backend._open_temp(self._path)
        self._open = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._open:
            raise BackendError(f"write to {self._key} after commit or abort")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.abort()
            raise self._failed(exc) from None

    def commit(self) -> None:
        if not self._open:
            raise BackendError(f"commit of {self._key} after commit or abort")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._open = False
            os.replace(self._tmp, self._path)
            fsync_dir(self._path.parent)
        except OSError as exc:
            self.abort()
            raise self._failed(exc) from None

    def abort(self) -> None:
        if self._open:
            self._open = False
            os.close(self._fd)
        self._tmp.unlink(missing_ok=True)

    def _failed(self, exc: OSError) -> BackendError:
        return BackendError(f"cannot write {self._key} in {self._backend.root}: {exc.strerror}")
