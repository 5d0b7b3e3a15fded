"""Delta restore: bring an existing, stopped data directory to a backup's content.

Files already on disk are read and hashed block by block with the repository's content id;
only blocks whose id differs from the manifest's are fetched and rewritten. Everything the
backup does not have is removed (as a fresh restore would not have it), and modes, owners and
times are set as for a fresh restore.

global/pg_control is removed before anything else changes and written back last, so a delta
restore that is interrupted leaves a directory PostgreSQL refuses to start; rerunning the
same delta restore finishes the job.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pgvault.errors import RestoreTargetError
from pgvault.repository.manifest import FileEntry, Manifest
from pgvault.repository.repository import Repository

READ_CHUNK = 4 << 20  # bytes read per system call while comparing


def wants_delta(pg_data: Path) -> bool:
    """--delta over a missing or empty directory is simply a fresh restore."""
    return pg_data.is_dir() and any(pg_data.iterdir())


def check_target(pg_data: Path) -> None:
    if (pg_data / "postmaster.pid").exists():
        raise RestoreTargetError(f"restore target {pg_data} holds a running (or crashed) cluster: stop it first")
    if not (pg_data / "PG_VERSION").is_file():
        raise RestoreTargetError(
            f"restore target {pg_data} is not a PostgreSQL data directory (no PG_VERSION): refusing --delta; "
            "use an empty directory or --force"
        )


def prune(root: Path, expected: dict[str, FileEntry], links: dict[str, Path]) -> int:
    """Remove what the backup does not have, or has as another type; returns paths removed.

    expected: relative path -> entry; links: relative path -> symlink target we will create.
    """
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*dirnames, *filenames]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            path = Path(dirpath) / name
            if not _matches(path, expected.get(rel), links.get(rel)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
        dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).is_dir() and not (Path(dirpath) / d).is_symlink()]
    return removed


def _matches(path: Path, entry: FileEntry | None, link_target: Path | None) -> bool:
    if link_target is not None:
        return path.is_symlink() and Path(os.readlink(path)) == link_target
    if entry is None:
        return False
    if entry.type == "l":
        return path.is_symlink() and os.readlink(path) == (entry.link or "")
    if path.is_symlink():
        return False
    return path.is_dir() if entry.type == "d" else path.is_file()


def sync_file(repo: Repository, manifest: Manifest, path: Path, entry: FileEntry) -> tuple[int, int]:
    """Rewrite only the blocks of path that differ; returns (bytes written, bytes compared)."""
    ids = repo.file_block_ids(entry)
    block_size = entry.block_size or manifest.block_size
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        stale = _stale_blocks(repo, fd, ids, block_size, min(size, entry.size), entry.size)
        written = 0
        if stale:
            for index, data in zip(stale, repo.read_blocks([ids[i] for i in stale])):
                os.pwrite(fd, data, index * block_size)
                written += len(data)
        if size != entry.size:
            os.ftruncate(fd, entry.size)
        if written or size != entry.size:
            os.fsync(fd)
        return written, min(size, entry.size)
    finally:
        os.close(fd)


def _stale_blocks(repo: Repository, fd: int, ids: list[bytes], block_size: int, on_disk: int, size: int) -> list[int]:
    """Indexes of blocks whose bytes on disk do not hash to the manifest's id."""
    stale = []
    buffer = bytearray(max(READ_CHUNK - READ_CHUNK % block_size, block_size))
    view = memoryview(buffer)
    index = 0
    offset = 0
    while offset < on_disk:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            break
        for start in range(0, got, block_size):
            if index >= len(ids):
                break
            want = min(block_size, size - index * block_size)
            piece = view[start : start + want]
            if len(piece) != want or repo.keys.block_id(piece) != ids[index]:
                stale.append(index)
            index += 1
        offset += got
    stale.extend(range(index, len(ids)))
    return stale
