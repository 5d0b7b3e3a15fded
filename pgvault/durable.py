"""Durability on local filesystems: a rename or a new file is only durable once its directory is fsynced."""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str, data: bytes | bytearray | memoryview) -> bool:
    """Create path holding data, durably, unless it exists: False then (nothing written).

    The data goes to a temporary file in the same directory (fsynced), which is then linked
    under the final name: link(2) fails if the name exists, so of two writers racing for one
    name exactly one wins and a reader never sees a partial file. Only os is imported: the
    synchronous wal-push path (pgvault/_walpush.py) stores its segment with this.
    """
    if os.path.exists(path):
        return False
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp.{name}.{os.urandom(16).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(directory)
    return True
