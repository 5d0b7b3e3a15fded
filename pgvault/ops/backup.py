"""backup: stream BASE_BACKUP into blocks, wait for the WAL, write the manifest last.

Nothing is visible until the manifest is written: a backup killed midway leaves only
packs that no manifest names (garbage collection removes them; a rerun reuses their blocks).

On PostgreSQL 17+ with summarize_wal, `--type incr` uploads the parent's backup_manifest and
asks for an INCREMENTAL stream, so the server reads and sends only changed pages; the files are
rebuilt against the parent's blocks, so the new manifest is still complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pgvault._malloc import bound_heap
from pgvault import __version__
from pgvault.config import Options
from pgvault.errors import ConfigError, PostgresError, WalError
from pgvault.ops.common import check_cluster, open_repository
from pgvault.pg import control, relfile, wal
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
from pgvault.progress import Progress, progress
from pgvault.repository import incremental, locks
from pgvault.repository.blockstore import BlockStore, FileBuilder
from pgvault.repository.manifest import FileEntry, Manifest, Tablespace
from pgvault.repository.repository import Repository, StanzaInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest


@dataclass
class Parent:
    """The backup an incremental stream is relative to: its files by (tablespace, path)."""

    manifest: Manifest
    files: dict[tuple[int | None, str], FileEntry]


@dataclass
class Stream:
    """What one BASE_BACKUP produced."""

    start: BackupStart | None = None
    end: BackupEnd | None = None
    files: list[FileEntry] = field(default_factory=list)
    tablespaces: list[Tablespace] = field(default_factory=list)
    server_manifest: FileEntry = field(default_factory=lambda: FileEntry(path="backup_manifest", type="f", mode=0o600))


class ArchiveSink:
    """TarSink for one tablespace archive: members become FileEntries."""

    def __init__(
        self,
        store: BlockStore,
        tablespace: int | None,
        files: list[FileEntry],
        verify_from_lsn: int | None,
        parent: Parent | None,
    ) -> None:
        """verify_from_lsn: check page checksums of pages older than this LSN (None: off)."""
        self.store = store
        self.tablespace = tablespace
        self.files = files
        self.verify_from_lsn = verify_from_lsn
        self.parent = parent
        self._builder: FileBuilder | None = None
        self._label: bytearray | None = None

    def member_start(self, member: TarMember) -> None:
        path = member.name
        rebuilt = incremental.full_name(path) if self.parent else None
        entry = FileEntry(
            path=rebuilt or path,
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
        if member.type != "f":
            return
        first = relfile.first_block(entry.path) if self.verify_from_lsn is not None else None
        start_lsn = self.verify_from_lsn or 0
        if rebuilt is not None:
            assert self.parent is not None
            base = self.parent.files.get((self.tablespace, rebuilt))
            if base is None:
                raise PostgresError(f"the server sent {path} as incremental, but the parent backup lacks {rebuilt}")
            ids = self.store.repo.file_block_ids(base)
            self._builder = incremental.IncrementalFileBuilder(self.store, entry, ids, base.size, first, start_lsn)
        elif self.parent is not None and self.tablespace is None and path == "backup_label":
            self._label = bytearray()
            self._builder = FileBuilder(self.store, entry)
        else:
            self._builder = FileBuilder(self.store, entry, first, start_lsn)

    def member_data(self, data: memoryview) -> None:
        if self._label is not None:
            self._label += data
            return
        assert self._builder is not None
        self._builder.write(data)

    def member_end(self) -> None:
        if self._builder is None:
            return
        if self._label is not None:
            # PostgreSQL refuses to start from a backup_label that names an incremental
            # parent; the rebuilt files make this a full backup, as pg_combinebackup does.
            lines = self._label.decode().splitlines(keepends=True)
            label = "".join(line for line in lines if not line.startswith("INCREMENTAL FROM")).encode()
            self._builder.entry.size = len(label)
            self._builder.write(memoryview(label))
            self._label = None
        self._builder.close()
        self._builder = None


def _new_backup_id(repo: Repository, stanza: str, kind: str) -> str:
    """UTC time of the start, to the second; ids sort in time order across types."""
    existing = {b[:15] for b in repo.list_backups(stanza)}
    while (stamp := time.strftime("%Y%m%d-%H%M%S", time.gmtime())) in existing:
        time.sleep(0.05)
    return stamp + ("F" if kind == "full" else "I")


def _parse_annotations(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"annotation {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


def _incremental_parent(repo: Repository, stanza: str, conn: ReplicationConnection) -> tuple[Parent | None, str]:
    """The parent for a PG17 incremental stream, or None and the reason there is none."""
    if conn.server_version < 170000:
        return None, f"PostgreSQL {conn.server_version // 10000} has no incremental BASE_BACKUP"
    if conn.show("summarize_wal") != "on":
        return None, "summarize_wal is off"
    backups = repo.list_backups(stanza)
    if not backups:
        return None, "there is no earlier backup"
    manifest = repo.load_manifest(stanza, backups[-1])
    if manifest.server_manifest is None or manifest.pg_version < 170000:
        return None, f"backup {manifest.backup_id} has no PostgreSQL 17 backup_manifest"
    files = {(f.tablespace, f.path): f for f in manifest.files if f.type == "f"}
    return Parent(manifest, files), ""


def _stream(
    conn: ReplicationConnection,
    store: BlockStore,
    label: str,
    verify: bool,
    parent: Parent | None,
    bar: Progress,
) -> Stream:
    out = Stream()
    tar: TarStream | None = None
    manifest_builder: FileBuilder | None = None
    for event in conn.base_backup(label, verify_checksums=False, incremental=parent is not None):
        if isinstance(event, ArchiveData):
            assert tar is not None
            tar.feed(event.data)
            bar.add(len(event.data))
        elif isinstance(event, ArchiveStart):
            assert out.start is not None
            sink = ArchiveSink(store, event.tablespace_oid, out.files, out.start.lsn if verify else None, parent)
            tar = TarStream(sink, end_marker=event.end_marker)
        elif isinstance(event, ArchiveEnd):
            assert tar is not None
            tar.finish()
            tar = None
        elif isinstance(event, ManifestData):
            if manifest_builder is None:
                manifest_builder = FileBuilder(store, out.server_manifest)
            manifest_builder.write(event.data)
            out.server_manifest.size += len(event.data)
        elif isinstance(event, BackupStart):
            out.start = event
        elif isinstance(event, TablespaceRow):
            if event.oid is not None and event.location is not None:
                out.tablespaces.append(Tablespace(event.oid, event.location))
        elif isinstance(event, BackupEnd):
            out.end = event
    if manifest_builder is not None:
        manifest_builder.close()
    return out


def backup(opts: Options) -> BackupResult:
    bound_heap()  # before the worker threads start (pgvault/_malloc.py)
    stanza = opts.require_stanza()
    kind = opts.type or "incr"
    if kind not in ("full", "incr"):
        raise ConfigError(f"backup --type must be full or incr, not {kind!r}")
    annotations = _parse_annotations(opts.annotation)
    repo = open_repository(opts)
    info = repo.stanza_info(stanza)
    # Shared with other backups, restores and verifies; exclusive against GC (which must not
    # delete blocks this backup dedups against) and against another backup of this stanza.
    # Taken before the index is loaded, so GC cannot change it between load and use.
    lock = locks.hold(repo, locks.LockRequest("backup", stanza=stanza), opts.lock_timeout)
    try:
        return _backup(opts, stanza, kind, annotations, repo, info, lock)
    finally:
        lock.release()


def _backup(
    opts: Options, stanza: str, kind: str, annotations: dict[str, str], repo: Repository, info: StanzaInfo,
    lock: locks.RepositoryLock,
) -> BackupResult:
    bar = progress(opts.progress, "backup", 0)
    if bar.enabled:
        bar.total = _size_estimate(repo, stanza)
    conn = ReplicationConnection(opts.pg_conninfo)
    store: BlockStore | None = None
    try:
        ident = conn.identify_system()
        check_cluster(info, ident.system_id, conn.server_version)
        pg_version = conn.server_version
        verify = conn.show("data_checksums") == "on"
        backup_id = _new_backup_id(repo, stanza, kind)
        start_time = _utc_now()
        parent: Parent | None = None
        if kind == "incr":
            parent, reason = _incremental_parent(repo, stanza, conn)
            if parent is None:
                log.info("streaming every page: %s", reason)
        label = f"pgvault backup {backup_id}"
        with OrderedPool[Any](opts.jobs, max_inflight=opts.jobs * 8) as pool:
            store = BlockStore(repo, pool, codec_by_name(opts.compress), opts.compress_level)
            if kind == "incr":
                store.use_blocklist_bases(parent.manifest if parent else repo.latest_manifest(stanza))
            try:
                if parent is not None:
                    assert parent.manifest.server_manifest is not None
                    conn.upload_manifest(_read_file(repo, parent.manifest.server_manifest))
                stream = _stream(conn, store, label, verify, parent, bar)
            except PostgresError as exc:
                if parent is None or store.blocks_total:
                    raise
                # Summaries missing or too old, or the parent unknown to the server: fall back.
                log.warning("incremental backup refused (%s); streaming every page instead", exc)
                parent = None
                conn.close()
                conn = ReplicationConnection(opts.pg_conninfo)
                stream = _stream(conn, store, label, verify, None, bar)
            store.finish()
    except BaseException:
        if store is not None:
            store.abort()  # discard the pack being filled (its temp file)
        raise
    finally:
        conn.close()
        bar.close()
    if stream.start is None or stream.end is None:
        raise WalError("the server did not report the backup's start and stop positions")
    needed = wal.segments_between(stream.start.tli, stream.start.lsn, stream.end.lsn, info.wal_segment_size)
    _wait_for_wal(repo, stanza, needed, opts.archive_timeout)
    files = stream.files
    manifest = Manifest(
        backup_id=backup_id,
        stanza=stanza,
        type=kind,
        start_time=start_time,
        stop_time=_utc_now(),
        start_lsn=wal.format_lsn(stream.start.lsn),
        stop_lsn=wal.format_lsn(stream.end.lsn),
        timeline=stream.start.tli,
        stop_timeline=stream.end.tli,
        start_wal=needed[0],
        stop_wal=needed[-1],
        pg_version=pg_version,
        system_id=ident.system_id,
        wal_segment_size=info.wal_segment_size,
        block_size=repo.settings.block_size,
        database_size=sum(f.size for f in files if f.type == "f"),
        repo_bytes_added=store.packs.bytes_written,
        blocks_total=store.blocks_total,
        blocks_new=store.blocks_new,
        tablespaces=stream.tablespaces,
        files=files,
        server_manifest=stream.server_manifest if stream.server_manifest.size else None,
        annotations=annotations,
        parent=parent.manifest.backup_id if parent else None,
        pgvault_version=__version__,
        next_xid=_next_xid(repo, files),
    )
    lock.ensure_held()
    repo.save_manifest(manifest)
    failures = sum(len(f.checksum_failures or ()) for f in files)
    if failures:
        log.warning("backup %s found %d page checksum failures: see 'pgvault info'", backup_id, failures)
    log.info("backup %s complete: %d files, %d new of %d blocks", backup_id, len(files), store.blocks_new, store.blocks_total)
    return BackupResult(manifest)


def _utc_now() -> str:
    """Microseconds matter: a time recovery target is compared with the stop time."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _next_xid(repo: Repository, files: list[FileEntry]) -> int | None:
    for entry in files:
        if entry.tablespace is None and entry.path == "global/pg_control":
            return control.next_xid(_read_file(repo, entry))
    return None


def _size_estimate(repo: Repository, stanza: str) -> int:
    """The last backup's size: the progress display's total (BASE_BACKUP runs without PROGRESS)."""
    backups = repo.list_backups(stanza)
    return repo.load_manifest(stanza, backups[-1]).database_size if backups else 0


def _read_file(repo: Repository, entry: FileEntry) -> bytes:
    return b"".join(repo.read_block(block_id) for block_id in repo.file_block_ids(entry))


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
        time.sleep(0.05)
