"""info: what the repository holds, per stanza, for people and for monitoring."""

from __future__ import annotations

from typing import Any

from pgvault.config import Options
from pgvault.ops.common import open_repository


def info(opts: Options) -> list[dict[str, Any]]:
    repo = open_repository(opts)
    stanzas = [opts.stanza] if opts.stanza else repo.stanzas()
    out = []
    for stanza in stanzas:
        stanza_info = repo.stanza_info(stanza)
        backups = [repo.load_manifest(stanza, b).summary() for b in repo.list_backups(stanza)]
        segments = sorted(n for n in repo.list_wal(stanza) if len(n) == 24)
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
                    "segments": len(segments),
                },
                "backups": backups,
            }
        )
    return out


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
        if not stanza["backups"]:
            lines.append("  no backups")
        for b in stanza["backups"]:
            lines.append(f"  backup {b['id']} ({b['type']})")
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
