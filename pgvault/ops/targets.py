"""Recovery targets: parse and check them, pick the backup to restore, and check the archive.

Everything here runs before restore writes a byte, so a target that cannot be reached is a
clear error instead of a cluster that stops (or worse, promotes) at the wrong place.

Backup choice, unless --set names one: the newest backup on the target timeline's history
that ends before the target (time: stop time; lsn: stop LSN; xid: the start checkpoint's
next xid, so the target transaction began after the backup did). A named restore point
cannot be located without reading WAL, so 'name' (like 'immediate' and 'default') takes the
newest backup.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from pgvault.errors import ConfigError, NotFoundError, RestoreTargetError, WalError
from pgvault.pg import timeline as tl
from pgvault.pg import wal
from pgvault.repository.manifest import Manifest
from pgvault.repository.repository import Repository

log = logging.getLogger(__name__)

KINDS = ("default", "immediate", "time", "xid", "lsn", "name", "standby", "none")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
MAX_NAME = 63  # MAXFNAMELEN - 1, the longest restore point name


@dataclass(frozen=True)
class Target:
    kind: str
    value: str | None  # as written into recovery_target_* (times normalized to UTC)
    time: datetime | None = None
    xid: int | None = None
    lsn: int | None = None
    timeline: str | None = None  # 'current', 'latest' or a number, as the user gave it
    exclusive: bool = False

    @property
    def replays_wal(self) -> bool:
        return self.kind != "none"


def parse(kind: str | None, value: str | None, timeline: str | None, exclusive: bool) -> Target:
    """Validate the target options together; ConfigError names what to fix."""
    kind = kind or "default"
    if kind not in KINDS:
        raise ConfigError(f"restore --type must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind in ("time", "xid", "lsn", "name"):
        if not value:
            raise ConfigError(f"restore --type {kind} needs --target")
    elif value:
        raise ConfigError(f"--target is only valid with --type time, xid, lsn or name (got --type {kind})")
    if exclusive and kind not in ("time", "xid", "lsn"):
        raise ConfigError("--target-exclusive is only valid with --type time, xid or lsn")
    if timeline is not None:
        _check_timeline(timeline)
    target = Target(kind, value, timeline=timeline, exclusive=exclusive)
    if kind == "time":
        when = _parse_time(value or "")
        return Target(kind, when.strftime("%Y-%m-%d %H:%M:%S.%f+00"), time=when, timeline=timeline, exclusive=exclusive)
    if kind == "xid":
        if not (value or "").isdigit() or int(value or 0) < 3:
            raise ConfigError(f"--target {value!r} is not a transaction id (a whole number, 3 or more)")
        return Target(kind, value, xid=int(value or 0), timeline=timeline, exclusive=exclusive)
    if kind == "lsn":
        if not LSN_RE.match(value or ""):
            raise ConfigError(f"--target {value!r} is not an LSN (like 0/16B3748)")
        return Target(kind, value, lsn=wal.parse_lsn(value or ""), timeline=timeline, exclusive=exclusive)
    if kind == "name" and len(value or "") > MAX_NAME:
        raise ConfigError(f"--target: restore point names are at most {MAX_NAME} bytes")
    return target


def _check_timeline(text: str) -> None:
    if text in ("current", "latest"):
        return
    if not text.isdigit() or int(text) < 1 or int(text) > 0xFFFFFFFF:
        raise ConfigError(f"--target-timeline {text!r} must be current, latest or a timeline number")


def _parse_time(text: str) -> datetime:
    """ISO 8601 / PostgreSQL timestamptz text; without a zone, the local zone (as pgBackRest)."""
    cleaned = text.strip().replace("T", " ", 1)
    if cleaned.endswith(("Z", "z")):
        cleaned = cleaned[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ConfigError(
            f"--target {text!r} is not a time: use e.g. '2026-11-23 14:03:00+00' (ISO 8601, zone optional)"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time, made explicit for PostgreSQL
    return when.astimezone(timezone.utc)


def parse_stamp(text: str) -> datetime:
    """A manifest time ('2026-11-23T14:03:00Z' or with microseconds)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- choosing the backup ----------------------------------------------------------------


@dataclass(frozen=True)
class Lineage:
    """The timeline recovery will end on and the LSN range of each timeline on its history."""

    tli: int | None  # None: stay on the backup's own timeline ('current')
    ranges: dict[int, int]  # timeline -> end LSN (exclusive) on the target's history


def resolve_lineage(repo: Repository, stanza: str, target: Target, backups: list[Manifest]) -> Lineage:
    if target.timeline == "current":
        return Lineage(None, {})
    histories = {int(n[:8], 16) for n in repo.list_wal(stanza) if wal.HISTORY_RE.match(n)}
    known = histories | {b.timeline for b in backups} | {1}
    if target.timeline in (None, "latest"):
        tli = max(known)
    else:
        tli = int(target.timeline)
        if tli not in known:
            raise RestoreTargetError(
                f"timeline {tli} is unknown to stanza {stanza}: its history file {tl.history_name(tli)} is not in the archive"
            )
    history: list[tl.Switch] = []
    if tli > 1 and tli in histories:
        try:
            history = tl.parse_history(repo.get_wal(stanza, tl.history_name(tli)).decode())
        except ValueError as exc:
            raise WalError(f"timeline history {tl.history_name(tli)} in the archive is corrupt: {exc}") from None
    return Lineage(tli, tl.lineage(tli, history))


def _on_lineage(backup: Manifest, lineage: Lineage) -> bool:
    if lineage.tli is None:
        return True
    end = lineage.ranges.get(backup.timeline)
    return end is not None and wal.parse_lsn(backup.stop_lsn) <= end


def _before_target(backup: Manifest, target: Target) -> bool:
    if target.time is not None:
        return parse_stamp(backup.stop_time) <= target.time
    if target.lsn is not None:
        return wal.parse_lsn(backup.stop_lsn) <= target.lsn
    if target.xid is not None:
        if backup.next_xid is None:
            return False
        xid = target.xid
        if xid < 1 << 32:  # a 32-bit xid: take it as being in the backup's xid epoch
            xid |= backup.next_xid & ~0xFFFFFFFF
        return backup.next_xid <= xid
    return True


def _describe(target: Target) -> str:
    return f"{target.kind} {target.value}"


def choose(repo: Repository, stanza: str, target: Target, wanted: str) -> tuple[Manifest, Lineage]:
    """The backup to restore for target (or the one --set names, checked against it)."""
    ids = repo.list_backups(stanza)
    if not ids:
        raise NotFoundError(f"stanza {stanza} has no backups to restore")
    if wanted != "latest" and wanted not in ids:
        raise NotFoundError(f"backup {wanted} not found in stanza {stanza} (have: {', '.join(ids)})")
    if target.time is not None and target.time > datetime.now(timezone.utc):
        raise RestoreTargetError(f"recovery target time {target.value} is in the future")
    if wanted != "latest":
        manifest = repo.load_manifest(stanza, wanted)
        lineage = resolve_lineage(repo, stanza, target, [manifest])
        if not _on_lineage(manifest, lineage):
            raise RestoreTargetError(f"backup {wanted} is not on the history of timeline {lineage.tli}")
        if not _before_target(manifest, target):
            raise RestoreTargetError(f"backup {wanted} ends after the recovery target {_describe(target)}: choose an older backup")
        return manifest, lineage
    manifests = [repo.load_manifest(stanza, backup_id) for backup_id in ids]
    lineage = resolve_lineage(repo, stanza, target, manifests)
    candidates = [m for m in manifests if _on_lineage(m, lineage)]
    if not candidates:
        raise RestoreTargetError(f"no backup of stanza {stanza} is on the history of timeline {lineage.tli}")
    fitting = [m for m in candidates if _before_target(m, target)]
    if not fitting:
        oldest = candidates[0]
        ends = oldest.stop_time if target.time else oldest.stop_lsn
        raise RestoreTargetError(
            f"recovery target {_describe(target)} is before the end of the oldest backup {oldest.backup_id} ({ends})"
        )
    return fitting[-1], lineage


# -- checking the archive ---------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveReach:
    end_lsn: int  # WAL is continuous on the path from the backup's start up to here
    gap: str | None  # the first missing segment, when later WAL on the path exists


def archive_reach(repo: Repository, stanza: str, backup: Manifest, lineage: Lineage) -> ArchiveReach:
    """How far recovery from this backup can replay along the target timeline's history."""
    seg_size = backup.wal_segment_size
    present = set(n for n in repo.list_wal(stanza) if wal.SEGMENT_RE.match(n))
    ranges = lineage.ranges if lineage.tli is not None else {backup.timeline: tl.INFINITE_LSN}
    # Timelines on the path from the backup's onward, each with its first segment.
    path = sorted((tli, end) for tli, end in ranges.items() if tli >= backup.timeline)
    starts = {backup.timeline: 0}
    for (_, end), (child, _) in zip(path, path[1:]):
        starts[child] = wal.segment_of(end, seg_size)

    def tli_for(segno: int) -> int:
        return max(t for t, first in starts.items() if first <= segno)

    segno = wal.parse_segment_name(backup.start_wal, seg_size)[1]
    while wal.segment_name(tli_for(segno), segno, seg_size) in present:
        segno += 1
    end_lsn = segno * seg_size
    later = [n for n in present if (t := int(n[:8], 16)) in starts and wal.parse_segment_name(n, seg_size)[1] > segno
             and tli_for(wal.parse_segment_name(n, seg_size)[1]) == t]
    gap = wal.segment_name(tli_for(segno), segno, seg_size) if later else None
    return ArchiveReach(end_lsn, gap)


def check_archive(repo: Repository, stanza: str, backup: Manifest, lineage: Lineage, target: Target) -> None:
    """Refuse targets the archive cannot reach; warn where only PostgreSQL can tell."""
    if not target.replays_wal:
        return
    reach = archive_reach(repo, stanza, backup, lineage)
    stop = wal.parse_lsn(backup.stop_lsn)
    if reach.end_lsn < stop:
        missing = wal.segment_name(backup.timeline, wal.segment_of(reach.end_lsn, backup.wal_segment_size), backup.wal_segment_size)
        raise WalError(f"WAL segment {missing}, needed to make backup {backup.backup_id} consistent, is missing from the archive")
    if target.kind == "lsn" and target.lsn is not None and target.lsn >= reach.end_lsn:
        if reach.gap:
            raise WalError(f"WAL segment {reach.gap} is missing from the archive, so recovery cannot reach LSN {target.value}")
        raise RestoreTargetError(
            f"recovery target LSN {target.value} is beyond the end of the archive ({wal.format_lsn(reach.end_lsn)})"
        )
    if reach.gap is None:
        return
    if target.kind in ("default", "standby"):
        raise WalError(
            f"WAL segment {reach.gap} is missing from the archive but later WAL exists: recovery would stop "
            f"there; restore with --type lsn --target {wal.format_lsn(reach.end_lsn)} (or earlier) to accept that"
        )
    if target.kind in ("time", "xid", "name"):
        log.warning(
            "WAL segment %s is missing from the archive: recovery cannot replay past %s; if the target lies "
            "beyond it, PostgreSQL will stop with 'recovery ended before configured recovery target was reached'",
            reach.gap, wal.format_lsn(reach.end_lsn),
        )
