"""The command table: name -> help, positional arguments, and the function that runs it.

Each runner imports its ops module when called, so a command loads only what it uses.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pgvault.config import Options

COMMAND_HELP: dict[str, tuple[str, list[str]]] = {
    "stanza-create": ("create the repository if absent and record the cluster", []),
    "backup": ("take a backup; prints its id", []),
    "restore": ("rebuild a data directory from a backup", []),
    "wal-push": ("archive one WAL file (archive_command)", ["wal_path"]),
    "wal-fetch": ("fetch one WAL file (restore_command)", ["wal_name", "destination"]),
    "info": ("show stanzas, backups and the WAL archive", []),
}


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _stanza_create(opts: Options) -> int:
    from pgvault.ops.stanza import stanza_create

    result = stanza_create(opts)
    if opts.output == "json":
        _print_json({"stanza": result.info.stanza, "created": result.created, "system_id": result.info.system_id})
    else:
        state = "created" if result.created else "already exists and matches the cluster"
        print(f"stanza {result.info.stanza} {state} (system {result.info.system_id})")
    return 0


def _backup(opts: Options) -> int:
    from pgvault.ops.backup import backup

    manifest = backup(opts).manifest
    if opts.output == "json":
        _print_json(manifest.summary())
    else:
        print(manifest.backup_id)
    return 0


def _restore(opts: Options) -> int:
    from pgvault.ops.restore import restore

    result = restore(opts)
    if opts.output == "json":
        _print_json({
            "backup": result.backup_id, "pg_data": result.pg_data, "files": result.files, "bytes": result.bytes,
            "bytes_compared": result.bytes_compared, "delta": result.delta,
        })
    elif result.delta:
        print(f"restored backup {result.backup_id} into {result.pg_data} (delta: {result.bytes} bytes rewritten, "
              f"{result.bytes_compared} compared)")
    else:
        print(f"restored backup {result.backup_id} into {result.pg_data}")
    return 0


def _wal_push(opts: Options) -> int:
    from pgvault.ops.wal import wal_push

    wal_push(opts)
    return 0


def _wal_fetch(opts: Options) -> int:
    from pgvault.ops.wal import wal_fetch

    wal_fetch(opts)
    return 0


def _info(opts: Options) -> int:
    from pgvault.ops.info import info, render_text

    report = info(opts)
    if opts.output == "json":
        _print_json(report)
    else:
        print(render_text(report))
    return 0


RUNNERS = {
    "stanza-create": _stanza_create,
    "backup": _backup,
    "restore": _restore,
    "wal-push": _wal_push,
    "wal-fetch": _wal_fetch,
    "info": _info,
}


def run(opts: Options) -> int:
    return RUNNERS[opts.command](opts)
