"""restore: rebuild PGDATA from a manifest, in parallel, and write recovery settings.

Files are written into place with their final modes; PostgreSQL only starts once the
operator starts it, and recovery.signal makes it replay WAL from the archive first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pgvault import _accel
from pgvault.config import Options, repo_option_args
from pgvault.durable import fsync_dir
from pgvault.errors import BackendError, ConfigError, RestoreTargetError
from pgvault.ops import delta, fetch_queue, targets
from pgvault.ops.common import open_repository
from pgvault.pg import recovery
from pgvault.progress import progress
from pgvault.repository import locks
from pgvault.repository.manifest import FileEntry, Manifest
from pgvault.repository.repository import Repository

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    pg_data: str
    files: int
    bytes: int  # written
    bytes_compared: int = 0  # delta restore: bytes already on disk that were checked
    delta: bool = False


def _tablespace_targets(manifest: Manifest, opts: Options) -> dict[int, Path]:
    mapping: dict[int, Path] = {}
    for item in opts.tablespace_map:
        oid, sep, directory = item.partition("=")
        if not sep or not oid.isdigit() or not directory.startswith("/"):
            raise ConfigError(f"--tablespace-map {item!r} must be OID=/absolute/dir")
        mapping[int(oid)] = Path(directory)
    known = {t.oid for t in manifest.tablespaces}
    for oid in mapping:
        if oid not in known:
            raise ConfigError(f"--tablespace-map names tablespace {oid}, which backup {manifest.backup_id} does not have")
    targets = {}
    for ts in manifest.tablespaces:
        if ts.oid in mapping:
            targets[ts.oid] = mapping[ts.oid]
        elif opts.tablespace_map_all:
            targets[ts.oid] = Path(opts.tablespace_map_all) / str(ts.oid)
        else:
            targets[ts.oid] = Path(ts.location)
    return targets


def _prepare_dir(path: Path, force: bool, what: str) -> None:
    """Make sure path is an empty directory (emptying it with --force)."""
    if path.exists() and not path.is_dir():
        raise RestoreTargetError(f"{what} {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if (path / "postmaster.pid").exists():
            raise RestoreTargetError(f"{what} {path} holds a running (or crashed) cluster: stop it first")
        if not force:
            raise RestoreTargetError(f"{what} {path} is not empty: restore into an empty directory or use --force")
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _self_command() -> str:
    """The command that runs this very pgvault, for restore_command.

    ``PYTHONPATH=<where pgvault is> python -S -c <entry>``: PostgreSQL runs restore_command
    from the data directory, where a different copy (or none) may be importable, and once per
    WAL file, so start-up time counts: -S skips site until a call needs more than the
    --archive-async fast path, and -c skips runpy (about 5 ms a call; see pgvault/_fastpath.py).
    """
    from pgvault._fastpath import self_command

    return self_command(sys.executable, str(Path(__file__).resolve().parents[2]))


def restore_command(opts: Options, stanza: str) -> str:
    parts = [_self_command()]
    if opts.config and Path(opts.config).exists():
        parts.append(f"--config={shlex.quote(str(Path(opts.config).resolve()))}")
    parts.append(f"--stanza={shlex.quote(stanza)}")
    parts.append(f"--repo={shlex.quote(opts.require_repo())}")
    parts.extend(shlex.quote(arg) for arg in repo_option_args(opts))
    if opts.passphrase_file:
        parts.append(f"--passphrase-file={shlex.quote(str(Path(opts.passphrase_file).resolve()))}")
    if opts.archive_async:
        parts.append(f"--archive-async --spool-path={shlex.quote(str(Path(opts.spool_path).absolute()))}")
        parts.append(f"--archive-get-queue-max={opts.archive_get_queue_max} --jobs={opts.jobs}")
    parts.append("wal-fetch %f %p")
    if opts.archive_async:  # a queued file is handed over by the shell, without starting Python
        queue = Path(opts.spool_path).absolute() / stanza / "fetch"  # what wal-fetch uses (ops/spool.py)
        return fetch_queue.shell_restore_command(str(queue), " ".join(parts))
    return " ".join(parts)


def _clear_fetch_queue(opts: Options, stanza: str) -> None:
    """A new recovery starts with an empty prefetch queue (see fetch_queue.clear)."""
    queue = Path(opts.spool_path).absolute() / stanza / "fetch"
    try:
        fetch_queue.clear(str(queue))
    except OSError as exc:
        raise ConfigError(f"cannot empty the WAL prefetch queue {queue}: {exc.strerror} (set --spool-path)") from None


def recovery_settings(opts: Options, stanza: str, target: targets.Target) -> recovery.RecoverySettings:
    settings: list[tuple[str, str]] = []
    if target.kind in ("time", "xid", "lsn", "name"):
        settings.append((f"recovery_target_{target.kind}", target.value or ""))
    elif target.kind == "immediate":
        settings.append(("recovery_target", "immediate"))
    if target.exclusive:
        settings.append(("recovery_target_inclusive", "false"))
    if opts.target_action:
        if target.kind in ("default", "standby", "none"):
            raise ConfigError(f"--target-action needs a recovery target, not --type {target.kind}")
        settings.append(("recovery_target_action", opts.target_action))
    if target.timeline:
        settings.append(("recovery_target_timeline", target.timeline))
    if target.kind == "none":
        return recovery.RecoverySettings(None, (), None)
    signal = "standby.signal" if target.kind == "standby" else "recovery.signal"
    return recovery.RecoverySettings(restore_command(opts, stanza), tuple(settings), signal)


def _owner(entry: FileEntry) -> tuple[int, int] | None:
    """As root, files go to the backup's owner (the cluster's user); otherwise we own them."""
    if os.geteuid() != 0:
        return None
    return entry.uid, entry.gid


def _write_all(fd: int, data: bytes) -> int:
    """write() all of data (one system call per chunk of up to 2 MiB), finishing short writes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


# Durability without stalls. A worker starts the disk writes of every WRITEBACK_BYTES a file gets
# (sync_file_range), and the files are fsynced only once all are written, SYNC_THREADS at a
# time, as PostgreSQL's own tools do (initdb, pg_basebackup, pg_rewind: fsync_pgdata at the
# end). An fsync right after each file held its worker until the disk caught up (a third of
# the workers' time, scale 100), and ~1000 small files each forced a journal commit of their
# own; at the end the data is mostly on disk already and concurrent fsyncs share commits.
# Scale 100 on this machine: 2.81-2.97 s with an fsync per file, 2.65-2.77 s this way (quiet);
# under load from other processes' I/O, 4.3 s against 2.3-2.7 s.
WRITEBACK_BYTES = 8 << 20
SYNC_THREADS = 8


def _write_file(repo: Repository, path: Path, entry: FileEntry) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = flushed = 0
    try:
        for chunk in repo.read_file(repo.file_ids(entry), entry.block_size or repo.settings.block_size):
            written += _write_all(fd, chunk)
            if written - flushed >= WRITEBACK_BYTES:
                _accel.writeback(fd, flushed, written - flushed)
                flushed = written
        if written != entry.size:
            raise RestoreTargetError(f"{entry.path}: restored {written} bytes, manifest says {entry.size}")
    finally:
        os.close(fd)
    _set_attributes(path, entry)
    return written


def _fsync_file(path: Path) -> None:
    # Read-only is enough on Linux, and works whatever mode the file was given; a writeback
    # error nobody has seen yet is reported to this fsync too (Linux >= 4.16).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_attributes(path: Path, entry: FileEntry) -> None:
    owner = _owner(entry)
    if owner:
        os.lchown(path, *owner)
    if entry.type != "l":
        os.chmod(path, entry.mode)
        os.utime(path, (entry.mtime, entry.mtime))


def restore(opts: Options) -> RestoreResult:
    stanza = opts.require_stanza()
    if not opts.pg_data:
        raise ConfigError("restore needs --pg-data: the directory to restore into")
    if opts.delta and opts.force:
        raise ConfigError("--delta and --force exclude each other: --delta keeps what matches, --force empties first")
    pg_data = Path(opts.pg_data).absolute()
    target = targets.parse(opts.type, opts.target, opts.target_timeline, opts.target_exclusive)
    repo = open_repository(opts)
    with _shared_lock(repo, opts.lock_timeout):
        return _restore(opts, repo, stanza, pg_data, target)


def _shared_lock(repo: Repository, timeout: float) -> contextlib.AbstractContextManager[object]:
    """Garbage collection must not delete packs while a restore reads them."""
    try:
        return locks.hold(repo, locks.LockRequest("restore"), timeout)
    except (OSError, BackendError) as exc:  # a read-only repository (a mount, read-only credentials)
        log.warning("cannot write a lock into the repository (%s): restoring without a lock", exc)
        return contextlib.nullcontext()


def _restore(opts: Options, repo: Repository, stanza: str, pg_data: Path, target: targets.Target) -> RestoreResult:
    repo.stanza_info(stanza)
    # Everything is validated before the first byte is written.
    manifest, lineage = targets.choose(repo, stanza, target, opts.set)
    targets.check_archive(repo, stanza, manifest, lineage, target)
    bar = progress(opts.progress, "restore", sum(f.size for f in manifest.files if f.type == "f"))
    repo.on_read = bar.add if bar.enabled else None
    ts_targets = _tablespace_targets(manifest, opts)
    settings = recovery_settings(opts, stanza, target)
    for oid, ts_dir in ts_targets.items():
        if ts_dir == pg_data or pg_data in ts_dir.parents:
            raise RestoreTargetError(f"tablespace {oid} would be restored inside the data directory: map it elsewhere")
    if opts.archive_async:
        _clear_fetch_queue(opts, stanza)
    delta_mode = opts.delta and delta.wants_delta(pg_data)
    if delta_mode:
        delta.check_target(pg_data)
        _prepare_delta(manifest, pg_data, ts_targets)
    else:
        _prepare_dir(pg_data, opts.force, "restore target")
        for oid, ts_dir in ts_targets.items():
            _prepare_dir(ts_dir, opts.force or opts.delta, f"tablespace {oid} directory")

    try:
        written, compared, count = _materialize(repo, manifest, pg_data, ts_targets, opts.jobs, delta_mode)
        bar.close()
        recovery.write(pg_data, settings)
        # pg_control last: until it is in place PostgreSQL refuses to start this directory,
        # so an interrupted restore can never be started as if it were complete.
        os.replace(pg_data / PG_CONTROL_TMP, pg_data / "global" / "pg_control")
        fsync_dir(pg_data / "global")
    except BaseException:
        if delta_mode:
            log.error("delta restore of %s did not finish; it has no global/pg_control and will not start: "
                      "run the same restore again", pg_data)
        else:
            for directory in (pg_data, *ts_targets.values()):
                _empty(directory)
        raise
    log.info("restored backup %s into %s: %d files, %d bytes written, %d compared",
             manifest.backup_id, pg_data, count, written, compared)
    return RestoreResult(manifest.backup_id, str(pg_data), count, written, compared, delta_mode)


def _prepare_delta(manifest: Manifest, pg_data: Path, ts_targets: dict[int, Path]) -> None:
    """Drop pg_control first (so an interrupted delta never starts), then what the backup lacks."""
    (pg_data / "global" / "pg_control").unlink(missing_ok=True)
    for root, oid in [(pg_data, None), *((path, oid) for oid, path in ts_targets.items())]:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        expected = {e.path: e for e in manifest.files if e.tablespace == oid}
        links = {f"pg_tblspc/{o}": path for o, path in ts_targets.items()} if oid is None else {}
        removed = delta.prune(root, expected, links)
        log.info("delta restore: removed %d paths from %s that the backup does not have", removed, root)


PG_CONTROL_TMP = "global/pg_control.pgvault.tmp"


def _file_path(root: Path, entry: FileEntry) -> Path:
    if entry.tablespace is None and entry.path == "global/pg_control":
        return root / PG_CONTROL_TMP
    return root / entry.path


def _empty(directory: Path) -> None:
    """Undo a failed restore: leave the (formerly empty) directory empty again."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _materialize(
    repo: Repository, manifest: Manifest, pg_data: Path, ts_targets: dict[int, Path], jobs: int, delta_mode: bool
) -> tuple[int, int, int]:
    """Create directories, links and files; returns (bytes written, bytes compared, files)."""

    def root_of(entry: FileEntry) -> Path:
        return pg_data if entry.tablespace is None else ts_targets[entry.tablespace]

    directories = [f for f in manifest.files if f.type == "d"]
    for entry in sorted(directories, key=lambda e: e.path.count("/")):
        path = root_of(entry) / entry.path
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in (f for f in manifest.files if f.type == "l"):
        path = root_of(entry) / entry.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.is_symlink():  # a delta restore keeps links that already match
            os.symlink(entry.link or "", path)
    for oid, target in ts_targets.items():
        link = pg_data / "pg_tblspc" / str(oid)
        link.parent.mkdir(mode=0o700, exist_ok=True)
        if not link.is_symlink():
            os.symlink(target, link)

    regular = sorted((f for f in manifest.files if f.type == "f"), key=lambda e: -e.size)

    def place(entry: FileEntry) -> tuple[int, int]:
        path = _file_path(root_of(entry), entry)
        if delta_mode and path.is_file():
            result = delta.sync_file(repo, manifest, path, entry)
            _set_attributes(path, entry)
            return result
        return _write_file(repo, path, entry), 0

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pgvault-restore") as pool:
        results = [f.result() for f in [pool.submit(place, e) for e in regular]]
    written = sum(r[0] for r in results)
    compared = sum(r[1] for r in results)
    with ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="pgvault-sync") as pool:
        list(pool.map(_fsync_file, [_file_path(root_of(e), e) for e in regular]))

    _rewrite_tablespace_map(pg_data, manifest, ts_targets)
    for entry in sorted(directories, key=lambda e: -e.path.count("/")):
        path = root_of(entry) / entry.path
        _set_attributes(path, entry)
        fsync_dir(path)
    group_access = any(d.path == "global" and d.mode & 0o050 for d in directories)
    os.chmod(pg_data, 0o750 if group_access else 0o700)
    if os.geteuid() == 0 and regular:
        os.chown(pg_data, regular[0].uid, regular[0].gid)
        for target in ts_targets.values():
            os.chown(target, regular[0].uid, regular[0].gid)
    fsync_dir(pg_data)
    return written, compared, len(regular)

def _rewrite_tablespace_map(pg_data: Path, manifest: Manifest, targets: dict[int, Path]) -> None:
    """PostgreSQL recreates pg_tblspc links from tablespace_map at recovery start: point it
    at the restored locations."""
    path = pg_data / "tablespace_map"
    if not manifest.tablespaces:
        return
    text = "".join(f"{oid} {target}\n" for oid, target in sorted(targets.items()))
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o600)
