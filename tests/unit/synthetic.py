"""Synthetic repositories for unit tests of verify and GC: real packs, index objects, block
lists, manifests and WAL objects, written through the same code a backup uses, without a server.
"""

from __future__ import annotations

import random
from typing import Any

from pgvault.backends.base import Backend
from pgvault.backends.memory import MemoryBackend
from pgvault.ops.verify import Verifier, VerifyReport
from pgvault.pg import wal
from pgvault.pipeline.codecs import Codec
from pgvault.pipeline.pool import OrderedPool
from pgvault.repository.blockstore import BlockStore, FileBuilder
from pgvault.repository.manifest import FileEntry, Manifest
from pgvault.repository.repository import Repository, RepoSettings, StanzaInfo

SEG = 16 * 1024 * 1024
BLOCK = 4096
PACK = 48 * 1024


def data(seed: int, size: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return random.Random(seed).randbytes(size)


def new_repo(backend: Backend | None = None, passphrase: bytes | None = None, stanzas: tuple[str, ...] = ("a",)) -> Repository:
    repo = Repository.create(backend or MemoryBackend(), passphrase, RepoSettings(BLOCK, PACK))
    for name in stanzas:
        repo.create_stanza(StanzaInfo(name, "7000000000000000001", 150004, SEG, "2026-01-01T00:00:00Z"))
    return repo


def write_backup(
    repo: Repository,
    stanza: str,
    backup_id: str,
    files: dict[str, bytes],
    wal_range: tuple[int, int],
    tli: int = 1,
    start_time: str = "2026-01-01T00:00:00Z",
) -> Manifest:
    """Store files as a backup would (blocks, packs, index, block lists), its WAL, then the manifest."""
    entries = []
    with OrderedPool[Any](2, 16) as pool:
        store = BlockStore(repo, pool, Codec.ZSTD, None)
        for path, content in files.items():
            entry = FileEntry(path=path, type="f", mode=0o600, size=len(content))
            builder = FileBuilder(store, entry)
            builder.write(memoryview(content))
            builder.close()
            entries.append(entry)
        store.finish()
    lo, hi = wal_range
    for segno in range(lo, hi + 1):
        put_segment(repo, stanza, tli, segno)
    manifest = Manifest(
        backup_id=backup_id, stanza=stanza, type="full", start_time=start_time, stop_time=start_time,
        start_lsn=wal.format_lsn(lo * SEG + 40), stop_lsn=wal.format_lsn(hi * SEG + 4096), timeline=tli,
        stop_timeline=tli, start_wal=wal.segment_name(tli, lo, SEG), stop_wal=wal.segment_name(tli, hi, SEG),
        pg_version=150004, system_id="7000000000000000001", wal_segment_size=SEG, block_size=BLOCK, files=entries,
    )
    repo.save_manifest(manifest)
    return manifest


def put_segment(repo: Repository, stanza: str, tli: int, segno: int) -> str:
    name = wal.segment_name(tli, segno, SEG)
    repo.put_wal(stanza, name, f"wal {name}".encode() * 100, Codec.ZSTD, None)
    return name


def restore_all(repo: Repository) -> dict[tuple[str, str, str], bytes]:
    """Every file of every backup, read back as restore reads it."""
    repo.forget_index()
    out = {}
    for stanza in repo.stanzas():
        for backup_id in repo.list_backups(stanza):
            manifest = repo.load_manifest(stanza, backup_id)
            for entry in manifest.files:
                out[(stanza, backup_id, entry.path)] = b"".join(repo.read_blocks(repo.file_block_ids(entry)))
    return out


def run_verify(repo: Repository, mode: str = "full", sample: float | None = None, rehash: bool = False) -> VerifyReport:
    repo.forget_index()
    report = VerifyReport(mode, sample, rehash=rehash)
    Verifier(repo, report, 2, "never").run([repo.stanza_info(s) for s in repo.stanzas()], None)
    return report
