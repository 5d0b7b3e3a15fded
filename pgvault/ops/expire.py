"""expire, gc, pin and unpin: retention, then garbage collection.

Retention is per stanza. A backup is kept when any rule keeps it:
- it is the stanza's newest backup (expire never leaves a stanza without a backup);
- it is pinned (`pgvault pin --set ID`): pins are small objects beside the manifests, so a
  backup can be pinned or unpinned after the fact while manifests stay immutable;
- `--keep-last N`: the N newest;
- `--keep-within DURATION`: started within DURATION of now;
- `--keep-daily/--keep-weekly/--keep-monthly N`: the newest backup of each of the last N
  days/ISO weeks/months (UTC) that have backups.
Expire refuses to run without a rule, so a typo cannot delete every backup.

WAL: every segment older than the oldest kept backup's start is removed. With
`--keep-wal-within DURATION` the point-in-time window is narrower: continuous WAL is kept from
the newest backup that stopped before the window began; older kept backups keep only the WAL
from their own start to stop, so they still restore to a consistent state. Timeline history
files are always kept.

Order: manifests of expired backups first (each deletion is atomic: the backup is gone), then
WAL, then GC, all under the exclusive repository lock. A kill at any point leaves a valid
repository; the next expire or gc finishes the job.
"""

from __future__ import annotations

import calendar
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from pgvault.config import Options
from pgvault.errors import ConfigError, NotFoundError
from pgvault.ops.common import open_repository
from pgvault.pg import wal
from pgvault.pipeline.envelope import Kind
from pgvault.repository import layout, locks
from pgvault.repository.gc import GcResult, collect
from pgvault.repository.manifest import Manifest
from pgvault.repository.repository import Repository


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_within: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None

    @classmethod
    def from_options(cls, opts: Options) -> Policy:
        return cls(opts.keep_last, opts.keep_within, opts.keep_daily, opts.keep_weekly, opts.keep_monthly)

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.keep_last, self.keep_within, self.keep_daily, self.keep_weekly, self.keep_monthly))


def parse_time(text: str) -> float:
    """A manifest time, '2026-11-23T20:00:00Z' or with microseconds ('...:00.123456Z'), as Unix time."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + (float(f"0.{fraction}") if fraction else 0.0)


_BUCKETS: tuple[tuple[str, Callable[[time.struct_time], tuple[int, ...]]], ...] = (
    ("daily", lambda t: (t.tm_year, t.tm_yday)),
    ("weekly", lambda t: tuple(int(x) for x in time.strftime("%G %V", t).split())),  # ISO year and week
    ("monthly", lambda t: (t.tm_year, t.tm_mon)),
)


def retained(backups: list[tuple[str, float]], pinned: set[str], policy: Policy, now: float) -> dict[str, list[str]]:
    """Which backups (id, start time; any order) to keep, each with the rules that keep it."""
    newest_first = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)
    reasons: dict[str, list[str]] = defaultdict(list)
    if newest_first:
        reasons[newest_first[0][0]].append("newest")
    for backup_id, _ in newest_first:
        if backup_id in pinned:
            reasons[backup_id].append("pinned")
    if policy.keep_last:
        for backup_id, _ in newest_first[: policy.keep_last]:
            reasons[backup_id].append(f"last {policy.keep_last}")
    if policy.keep_within is not None:
        for backup_id, started in newest_first:
            if now - started <= policy.keep_within:
                reasons[backup_id].append("within")
    counts = {"daily": policy.keep_daily, "weekly": policy.keep_weekly, "monthly": policy.keep_monthly}
    for label, bucket in _BUCKETS:
        wanted = counts[label]
        if not wanted:
            continue
        seen: list[tuple[int, ...]] = []
        for backup_id, started in newest_first:
            key = bucket(time.gmtime(started))
            if key in seen:
                continue
            if len(seen) == wanted:
                break
            seen.append(key)
            reasons[backup_id].append(label)
    return dict(reasons)


def wal_to_delete(names: list[str], kept: list[Manifest], seg_size: int, keep_wal_within: int | None, now: float) -> list[str]:
    """WAL files no kept backup needs (see the module docstring)."""
    if not kept:
        return []
    kept = sorted(kept, key=lambda m: m.backup_id)
    pitr_from = kept[0]
    if keep_wal_within is not None:
        before = [m for m in kept if parse_time(m.stop_time) <= now - keep_wal_within]
        pitr_from = before[-1] if before else kept[0]
    floor = wal.parse_segment_name(pitr_from.start_wal, seg_size)[1]
    own = []
    for m in kept:
        tli, lo = wal.parse_segment_name(m.start_wal, seg_size)
        own.append((tli, lo, wal.parse_segment_name(m.stop_wal, seg_size)[1]))
    doomed = []
    for name in names:
        if wal.wal_file_kind(name) == "history":
            continue
        tli, segno = wal.parse_segment_name(name[:24], seg_size)
        if segno >= floor or any(t == tli and lo <= segno <= hi for t, lo, hi in own):
            continue
        doomed.append(name)
    return doomed


@dataclass
class ExpireResult:
    stanza: str
    dry_run: bool
    kept: dict[str, list[str]] = field(default_factory=dict)
    expired: list[str] = field(default_factory=list)
    wal_deleted: list[str] = field(default_factory=list)
    gc: GcResult | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "stanza": self.stanza,
            "dry_run": self.dry_run,
            "kept": self.kept,
            "expired": self.expired,
            "wal_deleted": len(self.wal_deleted),
            "wal_deleted_range": [self.wal_deleted[0], self.wal_deleted[-1]] if self.wal_deleted else None,
            "gc": self.gc.as_dict() if self.gc else None,
        }


def pinned(repo: Repository, stanza: str) -> set[str]:
    prefix = layout.pin_prefix(stanza)
    return {info.key[len(prefix) : -len(".pin")] for info in repo.backend.list(prefix) if info.key.endswith(".pin")}


def expire(opts: Options, now: float | None = None) -> ExpireResult:
    stanza = opts.require_stanza()
    policy = Policy.from_options(opts)
    if policy.empty:
        raise ConfigError("expire needs a retention rule: --keep-last, --keep-within, --keep-daily, --keep-weekly or --keep-monthly")
    now = time.time() if now is None else now
    repo = open_repository(opts)
    info = repo.stanza_info(stanza)
    request = locks.LockRequest("expire", exclusive=not opts.dry_run)
    with locks.hold(repo, request, opts.lock_timeout) as lock:
        manifests = [repo.load_manifest(stanza, b) for b in repo.list_backups(stanza)]
        keep = retained([(m.backup_id, parse_time(m.start_time)) for m in manifests], pinned(repo, stanza), policy, now)
        result = ExpireResult(stanza, opts.dry_run, kept=keep)
        result.expired = [m.backup_id for m in manifests if m.backup_id not in keep]
        kept = [m for m in manifests if m.backup_id in keep]
        result.wal_deleted = wal_to_delete(repo.list_wal(stanza), kept, info.wal_segment_size, opts.keep_wal_within, now)
        if opts.dry_run:
            result.gc = collect(repo, None, dry_run=True, max_unused=opts.max_unused / 100,
                                skip=frozenset((stanza, b) for b in result.expired))
            return result
        lock.ensure_held()
        for backup_id in result.expired:
            repo.delete_backup(stanza, backup_id)
        for name in result.wal_deleted:
            repo.delete_wal(stanza, name)
        result.gc = collect(repo, lock, max_unused=opts.max_unused / 100)
    return result


def gc(opts: Options) -> GcResult:
    """Garbage collection alone: after killed backups, or after deleting backups by hand."""
    repo = open_repository(opts)
    with locks.hold(repo, locks.LockRequest("gc", exclusive=not opts.dry_run), opts.lock_timeout) as lock:
        return collect(repo, None if opts.dry_run else lock, dry_run=opts.dry_run, max_unused=opts.max_unused / 100)


def pin(opts: Options, on: bool) -> str:
    """Pin (or unpin) a backup: pinned backups are never expired. Returns the backup id."""
    stanza = opts.require_stanza()
    repo = open_repository(opts)
    repo.stanza_info(stanza)
    with locks.hold(repo, locks.LockRequest("pin" if on else "unpin"), opts.lock_timeout):
        backups = repo.list_backups(stanza)
        backup_id = backups[-1] if opts.set == "latest" and backups else opts.set
        if backup_id not in backups:
            raise NotFoundError(f"backup {opts.set} not found in stanza {stanza}")
        key = layout.pin_key(stanza, backup_id)
        if on:
            notes = dict(a.partition("=")[::2] for a in opts.annotation)
            doc = {"backup_id": backup_id, "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "notes": notes}
            repo.put_json(Kind.PIN, key, doc)
        else:
            repo.backend.delete(key)
    return backup_id
