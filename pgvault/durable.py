"""Durability on local filesystems: a rename or a new file is only durable once its directory is fsynced."""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
