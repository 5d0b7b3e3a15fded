"""backup: stream BASE_BACKUP into blocks, wait for the WAL, write the manifest last.

Nothing is visible until the manifest is written: a backup killed midway leaves only
packs that no manifest names (garbage collection removes them; a rerun reuses their blocks).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pgvault import __version__
from pgvault.config import Options
from pgvault.errors import ConfigError, WalError
from pgvault.ops.common import check_cluster, open_repository
from pgvault.pg import relfile, wal
from pgvault.pg.replication import (
    ArchiveData,
    ArchiveEnd,
    ArchiveStart,
    BackupEnd,
    BackupStart,
    ManifestData,
    ReplicationConnection,
    TablespaceRow,
)
from pgvault.pg.tarstream import TarMember, TarStream
from pgvault.pipeline.codecs import codec_by_name
from pgvault.pipeline.pool import OrderedPool
from pgvault.repository.blockstore import BlockResult, BlockStore, FileBuilder
from pgvault.repository.manifest import FileEntry, Manifest, Tablespace
from pgvault.repository.repository import Repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest


class ArchiveSink:
    """TarSink for one tablespace archive: members become FileEntries."""

    def __init__(
        self, store: BlockStore, tablespace: int | None, files: list[FileEntry], verify_from_lsn: int | None
    ) -> None:
        """verify_from_lsn: check page checksums of pages older than this LSN (None: off)."""
        self.store = store
        self.tablespace = tablespace
        self.files = files
        self.verify_from_lsn = verify_from_lsn
        self._builder: FileBuilder | None = None

    def member_start(self, member: TarMember) -> None:
        entry = FileEntry(
            path=member.name,
            type=member.type,
            mode=member.mode,
            size=member.size,
            mtime=member.mtime,
            uid=member.uid,
            gid=member.gid,
            tablespace=self.tablespace,
            link=member.linkname if member.type == "l" else None,
        )
        self.files.append(entry)
        if member.type == "f":
            first = relfile.first_block(member.name) if self.verify_from_lsn is not None else None
            self._builder = FileBuilder(self.store, entry, lambda _e: None, first, self.verify_from_lsn or 0)

    def member_data(self, data: memoryview) -> None:
        assert self._builder is not None
        self._builder.write(data)

    def member_end(self) -> None:
        if self._builder is not None:
            self._builder.close()
            self._builder = None


def _new_backup_id(repo: Repository, stanza: str, kind: str) -> str:
    """UTC time of the start, to the second; ids sort in time order across types."""
    existing = {b[:15] for b in repo.list_backups(stanza)}
    while (stamp := time.strftime("%Y%m%d-%H%M%S", time.gmtime())) in existing:
        time.sleep(0.2)
    return stamp + ("F" if kind == "full" else "I")


def _parse_annotations(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"annotation {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def backup(opts: Options) -> BackupResult:
    stanza = opts.require_stanza()
    kind = opts.type or "incr"
    if kind not in ("full", "incr"):
        raise ConfigError(f"backup --type must be full or incr, not {kind!r}")
    annotations = _parse_annotations(opts.annotation)
    repo = open_repository(opts)
    info = repo.stanza_info(stanza)
    store_codec = codec_by_name(opts.compress)
    with ReplicationConnection(opts.pg_conninfo) as conn:
        ident = conn.identify_system()
        check_cluster(info, ident.system_id, conn.server_version)
        pg_version = conn.server_version
        data_checksums = conn.show("data_checksums") == "on"
        backup_id = _new_backup_id(repo, stanza, kind)
        start_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        files: list[FileEntry] = []
        tablespaces: list[Tablespace] = []
        server_manifest = FileEntry(path="backup_manifest", type="f", mode=0o600)
        with OrderedPool[BlockResult](opts.jobs, max_inflight=opts.jobs * 8) as pool:
            store = BlockStore(repo, pool, store_codec, opts.compress_level)
            start = end = None
            tar: TarStream | None = None
            manifest_builder: FileBuilder | None = None
            for event in conn.base_backup(f"pgvault backup {backup_id}", verify_checksums=False):
                if isinstance(event, ArchiveData):
                    assert tar is not None
                    tar.feed(event.data)
                elif isinstance(event, ArchiveStart):
                    assert start is not None
                    sink = ArchiveSink(store, event.tablespace_oid, files, start.lsn if data_checksums else None)
                    tar = TarStream(sink, end_marker=event.end_marker)
                elif isinstance(event, ArchiveEnd):
                    assert tar is not None
                    tar.finish()
                    tar = None
                elif isinstance(event, ManifestData):
                    if manifest_builder is None:
                        manifest_builder = FileBuilder(store, server_manifest, lambda _e: None)
                    manifest_builder.write(event.data)
                    server_manifest.size += len(event.data)
                elif isinstance(event, BackupStart):
                    start = event
                elif isinstance(event, TablespaceRow):
                    if event.oid is not None and event.location is not None:
                        tablespaces.append(Tablespace(event.oid, event.location))
                elif isinstance(event, BackupEnd):
                    end = event
            if manifest_builder is not None:
                manifest_builder.close()
            store.finish()
    if start is None or end is None:
        raise WalError("the server did not report the backup's start and stop positions")
    seg_size = info.wal_segment_size
    needed = wal.segments_between(start.tli, start.lsn, end.lsn, seg_size)
    _wait_for_wal(repo, stanza, needed, opts.archive_timeout)
    manifest = Manifest(
        backup_id=backup_id,
        stanza=stanza,
        type=kind,
        start_time=start_time,
        stop_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        start_lsn=wal.format_lsn(start.lsn),
        stop_lsn=wal.format_lsn(end.lsn),
        timeline=start.tli,
        stop_timeline=end.tli,
        start_wal=needed[0],
        stop_wal=needed[-1],
        pg_version=pg_version,
        system_id=ident.system_id,
        wal_segment_size=seg_size,
        block_size=repo.settings.block_size,
        database_size=sum(f.size for f in files if f.type == "f"),
        blocks_total=store.blocks_total,
        blocks_new=store.blocks_new,
        tablespaces=tablespaces,
        files=files,
        server_manifest=server_manifest if server_manifest.size else None,
        annotations=annotations,
        pgvault_version=__version__,
    )
    manifest.repo_bytes_added = store.packs.bytes_written
    manifest.repo_bytes_added += repo.save_manifest(manifest)
    failures = sum(len(f.checksum_failures or ()) for f in files)
    if failures:
        log.warning("backup %s found %d page checksum failures: see 'pgvault info'", backup_id, failures)
    log.info("backup %s complete: %d files, %d new of %d blocks", backup_id, len(files), store.blocks_new, store.blocks_total)
    return BackupResult(manifest)


def _wait_for_wal(repo: Repository, stanza: str, segments: list[str], timeout: int) -> None:
    """Block until every segment the backup needs is in the repository, so it restores alone."""
    deadline = time.monotonic() + timeout
    remaining = list(segments)
    while remaining:
        remaining = [name for name in remaining if not repo.has_wal(stanza, name)]
        if not remaining:
            return
        if time.monotonic() > deadline:
            raise WalError(
                f"WAL segment {remaining[0]} needed by the backup was not archived within {timeout}s: "
                "check archive_mode and that archive_command runs 'pgvault wal-push'"
            )
        time.sleep(0.2)
