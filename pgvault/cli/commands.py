"""The command table: name -> help, positional arguments, and the function that runs it.

Each runner imports its ops module when called, so a command loads only what it uses.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from typing import Any

    from pgvault.config import Options

COMMAND_HELP: dict[str, tuple[str, list[str]]] = {
    "stanza-create": ("create the repository if absent and record the cluster", []),
    "backup": ("take a backup; prints its id", []),
    "restore": ("rebuild a data directory from a backup", []),
    "wal-push": ("archive one WAL file (archive_command)", ["wal_path"]),
    "wal-fetch": ("fetch one WAL file (restore_command)", ["wal_name", "destination"]),
    "info": ("show stanzas, backups and the WAL archive", []),
    "verify": ("check that backups and their WAL are complete and intact", []),
    "expire": ("remove backups and WAL outside the retention rules, then collect garbage", []),
    "gc": ("delete or repack packs that no backup references", []),
    "check": ("check configuration, repository, server and WAL archiving end to end", []),
    "pin": ("keep a backup (--set ID) whatever the retention rules say", []),
    "unpin": ("let expire remove a pinned backup again", []),
}


def _print_json(value: Any) -> None:
    import json

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


def _verify(opts: Options) -> int:
    from pgvault.ops.verify import render_text, verify

    report = verify(opts)
    if opts.output == "json":
        _print_json(report.as_dict())
    else:
        print(render_text(report))
    error = report.error()
    if error is not None:
        raise error
    return 0


def _expire(opts: Options) -> int:
    from pgvault.ops.expire import expire

    result = expire(opts)
    if opts.output == "json":
        _print_json(result.as_dict())
        return 0
    verb = "would " if result.dry_run else ""
    for backup_id, reasons in sorted(result.kept.items()):
        print(f"keep    {backup_id}  ({', '.join(reasons)})")
    for backup_id in result.expired:
        print(f"expire  {backup_id}")
    if result.wal_deleted:
        print(f"wal: {verb}remove {len(result.wal_deleted)} files ({result.wal_deleted[0]} .. {result.wal_deleted[-1]})")
    if result.gc is not None:
        print(_gc_line(result.gc.as_dict()))
    return 0


def _gc_line(gc: dict[str, Any]) -> str:
    verb = "would free" if gc["dry_run"] else "freed"
    return (
        f"gc: {gc['packs_deleted']} packs deleted, {gc['packs_repacked']} repacked into {gc['packs_written']}, "
        f"{gc['packs_orphaned']} orphans; {verb} {gc['bytes_freed'] / 2**20:.1f} MiB, "
        f"{gc['bytes_unused'] / 2**20:.1f} MiB unused left in mostly-live packs"
        + (f"; {gc['temp_deleted']} temp files of killed writers removed" if gc.get("temp_deleted") else "")
    )


def _gc(opts: Options) -> int:
    from pgvault.ops.expire import gc

    result = gc(opts).as_dict()
    if opts.output == "json":
        _print_json(result)
    else:
        print(_gc_line(result))
    return 0


def _check(opts: Options) -> int:
    from pgvault.ops.check import check, render_text

    result = check(opts)
    if opts.output == "json":
        _print_json([line.as_dict() for line in result.lines])
    else:
        print(render_text(result))
    return result.exit_code


def _pin(opts: Options) -> int:
    from pgvault.ops.expire import pin

    print(f"backup {pin(opts, on=opts.command == 'pin')} {'pinned' if opts.command == 'pin' else 'unpinned'}")
    return 0


RUNNERS = {
    "stanza-create": _stanza_create,
    "backup": _backup,
    "restore": _restore,
    "wal-push": _wal_push,
    "wal-fetch": _wal_fetch,
    "info": _info,
    "verify": _verify,
    "expire": _expire,
    "gc": _gc,
    "check": _check,
    "pin": _pin,
    "unpin": _pin,
}


def run(opts: Options) -> int:
    return RUNNERS[opts.command](opts)
