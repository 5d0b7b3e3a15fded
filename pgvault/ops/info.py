"""info: what the repository holds, per stanza, for people and for monitoring."""

from __future__ import annotations

import time
from typing import Any

from pgvault.config import Options
from pgvault.ops.common import open_repository
from pgvault.ops.expire import parse_time, pinned
from pgvault.ops.verify import last_result
from pgvault.ops.walcheck import WalArchive
from pgvault.repository.locks import list_locks


def info(opts: Options) -> list[dict[str, Any]]:
    repo = open_repository(opts)
    stanzas = [opts.stanza] if opts.stanza else repo.stanzas()
    running = list_locks(repo)
    out = []
    for stanza in stanzas:
        stanza_info = repo.stanza_info(stanza)
        pins = pinned(repo, stanza)
        backups = [repo.load_manifest(stanza, b).summary() for b in repo.list_backups(stanza)]
        for b in backups:
            b["pinned"] = b["id"] in pins
        names = repo.list_wal(stanza)
        segments = sorted(n for n in names if len(n) == 24)
        archive = WalArchive(segments, {}, stanza_info.wal_segment_size)
        out.append(
            {
                "stanza": stanza,
                "system_id": stanza_info.system_id,
                "pg_version": stanza_info.pg_version,
                "wal_segment_size": stanza_info.wal_segment_size,
                "encrypted": repo.keys.encrypted,
                "wal_archive": {
                    "first": segments[0] if segments else None,
                    "last": segments[-1] if segments else None,
                    "last_archived": archive.last(),
                    "segments": len(segments),
                    "timelines": sorted(archive.segments),
                },
                "backups": backups,
                # What monitoring alerts on, without walking the backup list.
                "last_backup": _last_backup(backups),
                "checksum_failures": sum(b["checksum_failures"] for b in backups),
                "last_verify": _verify_summary(last_result(repo, stanza)),
                "running": [lock for lock in running if lock["stanza"] in (None, stanza)],
            }
        )
    return out


def _last_backup(backups: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not backups:
        return None
    last = backups[-1]
    age = int(time.time() - parse_time(last["stop_time"]))
    return {
        "id": last["id"],
        "stop_time": last["stop_time"],
        "age_seconds": age,
        "database_size": last["database_size"],
        "repo_bytes_added": last["repo_bytes_added"],
        "checksum_failures": last["checksum_failures"],
    }


def _verify_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    faults = len(result.get("faults", [])) + sum(len(b["faults"]) for b in result.get("backups", []))
    return {
        "time": result.get("time"),
        "mode": result.get("mode"),
        "set": result.get("set"),
        "ok": result.get("ok"),
        "faults": faults,
        "failed_backups": [b["id"] for b in result.get("backups", []) if not b["ok"]],
        "first_fault": next((f for b in result.get("backups", []) for f in b["faults"]), None)
        or next(iter(result.get("faults", [])), None),
    }


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def render_text(report: list[dict[str, Any]]) -> str:
    lines = []
    for stanza in report:
        lines.append(
            f"stanza: {stanza['stanza']}  (PostgreSQL {stanza['pg_version'] // 10000}, system {stanza['system_id']}"
            f"{', encrypted' if stanza['encrypted'] else ''})"
        )
        wal = stanza["wal_archive"]
        lines.append(f"  wal archive: {wal['first'] or '-'} .. {wal['last'] or '-'} ({wal['segments']} segments)")
        verified = stanza["last_verify"]
        if verified:
            state = "ok" if verified["ok"] else f"{verified['faults']} faults: {verified['first_fault']}"
            lines.append(f"  last verify: {verified['time']} ({verified['mode']}): {state}")
        for lock in stanza["running"]:
            lines.append(f"  running: {lock['command']} on {lock['host']} pid {lock['pid']} since {lock['created']}"
                         f"{' (stale: ' + lock['stale'] + ')' if lock['stale'] else ''}")
        if not stanza["backups"]:
            lines.append("  no backups")
        for b in stanza["backups"]:
            lines.append(f"  backup {b['id']} ({b['type']}{', pinned' if b['pinned'] else ''})")
            lines.append(f"    time: {b['start_time']} .. {b['stop_time']}")
            lines.append(f"    lsn: {b['start_lsn']} .. {b['stop_lsn']}, timeline {b['timeline']}")
            lines.append(f"    wal: {b['start_wal']} .. {b['stop_wal']}")
            lines.append(
                f"    database size: {_size(b['database_size'])}, repository added: {_size(b['repo_bytes_added'])}"
                f" ({b['blocks_new']} new of {b['blocks_total']} blocks)"
            )
            if b["checksum_failures"]:
                lines.append(f"    page checksum failures: {b['checksum_failures']}")
            if b["annotations"]:
                lines.append("    annotations: " + ", ".join(f"{k}={v}" for k, v in b["annotations"].items()))
    return "\n".join(lines)
