"""wal-push and wal-fetch: what archive_command and restore_command run.

Started once per 16 MB segment, so this path imports no psycopg, no pool, no cloud SDK.
"""

from __future__ import annotations

import os
from pathlib import Path

from pgvault.config import Options
from pgvault.errors import ClusterMismatchError, ConfigError, WalError
from pgvault.ops.common import open_repository
from pgvault.pg import wal
from pgvault.pipeline.codecs import codec_by_name


def wal_push(opts: Options) -> bool:
    """Archive one WAL file. True if stored, False if the identical file was already there."""
    stanza = opts.require_stanza()
    if len(opts.args) != 1:
        raise ConfigError("wal-push takes one argument: the WAL file path (%p)")
    path = Path(opts.args[0])
    if not path.is_absolute() and opts.pg_data:
        path = Path(opts.pg_data) / path
    name = path.name
    try:
        kind = wal.wal_file_kind(name)
    except ValueError:
        raise ConfigError(f"{name!r} is not a WAL file name") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WalError(f"cannot read WAL file {path}: {exc.strerror}") from None
    repo = open_repository(opts)
    info = repo.stanza_info(stanza)
    if kind in ("segment", "partial"):
        if len(data) != info.wal_segment_size:
            raise WalError(f"WAL file {name} is {len(data)} bytes, expected {info.wal_segment_size}")
        sysid = wal.segment_system_id(data[:64])
        if sysid is not None and str(sysid) != info.system_id:
            raise ClusterMismatchError(
                f"WAL file {name} is from system {sysid}, but stanza {stanza} is system {info.system_id}"
            )
    return repo.put_wal(stanza, name, data, codec_by_name(opts.compress), opts.compress_level)


def wal_fetch(opts: Options) -> None:
    """Fetch one WAL file into DEST; NotFoundError (exit 1) only if it is truly absent."""
    stanza = opts.require_stanza()
    if len(opts.args) != 2:
        raise ConfigError("wal-fetch takes two arguments: the WAL file name (%f) and destination (%p)")
    name, dest = opts.args
    try:
        wal.wal_file_kind(name)
    except ValueError:
        raise ConfigError(f"{name!r} is not a WAL file name") from None
    repo = open_repository(opts)
    repo.stanza_info(stanza)  # an unknown stanza is a misconfiguration, never "absent"
    data = repo.get_wal(stanza, name)
    target = Path(dest)
    if not target.is_absolute() and opts.pg_data:
        target = Path(opts.pg_data) / target
    tmp = target.with_name(f".{target.name}.pgvault.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
