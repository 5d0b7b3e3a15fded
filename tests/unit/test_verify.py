"""verify on synthetic repositories: each kind of damage is found and names the backup; WAL
continuity follows timelines; retention rules and WAL expiry pick what a DBA expects."""

from __future__ import annotations

import io
import time

from pgvault.backends.memory import MemoryBackend
from pgvault.ops.expire import Policy, parse_time, retained, wal_to_delete
from pgvault.ops.verify import Verifier, VerifyReport
from pgvault.ops.walcheck import WalArchive, parse_history
from pgvault.pg import wal
from pgvault.progress import Progress, progress
from pgvault.repository import layout
from pgvault.repository.index import Location
from pgvault.repository.repository import Repository
from tests.unit.synthetic import SEG, data, new_repo, put_segment, run_verify, write_backup


def two_backups() -> tuple[MemoryBackend, Repository]:
    backend = MemoryBackend()
    repo = new_repo(backend)
    write_backup(repo, "a", "20260101-000000F", {"shared": data(1, 30_000), "old": data(2, 50_000)}, (1, 2))
    write_backup(repo, "a", "20260102-000000F", {"shared": data(1, 30_000), "new": data(3, 50_000)}, (3, 4))
    return backend, repo


def location_of(repo: Repository, content_seed: int, size: int) -> Location:
    """Where the first block of a file lives."""
    block = repo.keys.block_id(data(content_seed, size)[:4096])
    loc = repo.index.get(block)
    assert loc is not None
    return loc


def faults_by_backup(report: object) -> dict[str, list[str]]:
    return {b.backup_id: b.faults for b in report.backups if b.faults}  # type: ignore[attr-defined]


def test_clean_repository_verifies_in_every_mode() -> None:
    _, repo = two_backups()
    for mode, sample, rehash in (("full", None, False), ("full", None, True), ("sample", 30.0, False), ("metadata", None, False)):
        report = run_verify(repo, mode, sample, rehash)
        assert report.ok, (mode, rehash, report.faults, faults_by_backup(report))
    full = run_verify(repo)
    assert full.packs_checked == full.packs_used > 0 and full.wal_checked == 4
    assert [b.recoverable_to for b in full.backups] == [wal.segment_name(1, 4, SEG)] * 2
    assert run_verify(repo, "metadata").bytes_read == 0


def test_missing_pack_names_only_the_backups_that_need_it() -> None:
    backend, repo = two_backups()
    pack = location_of(repo, 3, 50_000).pack  # "new" is only in the second backup
    backend.delete(layout.pack_key(pack))
    report = run_verify(repo)
    faults = faults_by_backup(report)
    assert list(faults) == ["20260102-000000F"], faults
    assert f"pack {pack} is missing" in faults["20260102-000000F"][0] and "files new" in faults["20260102-000000F"][0]
    assert report.error() is not None and report.error().exit_code == 5  # type: ignore[union-attr]
    # Metadata-only mode does not enumerate block lists, but sees the pack the index lists is gone.
    meta = run_verify(repo, "metadata")
    assert not meta.ok and any(pack in fault for fault in meta.faults + sum(faults_by_backup(meta).values(), []))


def test_flipped_byte_is_found_by_rehash_or_authentication() -> None:
    backend, repo = two_backups()
    loc = location_of(repo, 2, 50_000)  # "old": first backup only
    key = layout.pack_key(loc.pack)
    raw = bytearray(backend.get(key))
    raw[loc.offset + 100] ^= 0x01
    backend.put(key, raw)
    for rehash in (False, True):
        report = run_verify(repo, rehash=rehash)
        faults = faults_by_backup(report)
        assert list(faults) == ["20260101-000000F"], faults
        assert "fail authentication" in faults["20260101-000000F"][0] and "old" in faults["20260101-000000F"][0]
    # Metadata-only mode reads no pack data, so it cannot see this.
    assert run_verify(repo, "metadata").ok


def test_deleted_wal_segment() -> None:
    backend, repo = two_backups()
    backend.delete(layout.wal_key("a", wal.segment_name(1, 3, SEG)))  # the second backup's start
    report = run_verify(repo)
    faults = faults_by_backup(report)
    assert "cannot be restored to a consistent state" in faults["20260102-000000F"][0]
    # For the first backup it is a gap after its stop: PITR stops there.
    assert "point-in-time recovery" in faults["20260101-000000F"][0]
    assert report.backups[0].recoverable_to == wal.segment_name(1, 2, SEG)
    assert report.error() is not None and report.error().exit_code == 9  # type: ignore[union-attr]


def test_damaged_wal_segment() -> None:
    backend, repo = two_backups()
    key = layout.wal_key("a", wal.segment_name(1, 4, SEG))
    raw = bytearray(backend.get(key))
    raw[20] ^= 0xFF
    backend.put(key, raw)
    faults = faults_by_backup(run_verify(repo))
    assert set(faults) == {"20260101-000000F", "20260102-000000F"}
    assert "unreadable" in faults["20260102-000000F"][0]


def test_timeline_switch_is_not_a_gap() -> None:
    repo = new_repo()
    write_backup(repo, "a", "20260101-000000F", {"f": data(1, 10_000)}, (1, 2))
    put_segment(repo, "a", 1, 3)
    # Promotion in segment 4 (at 0/4000100): timeline 2 carries on from segment 4.
    history = b"1\t0/4000100\tno recovery target specified\n"
    from pgvault.pipeline.codecs import Codec

    repo.put_wal("a", "00000002.history", history, Codec.ZSTD, None)
    for segno in (4, 5, 6):
        put_segment(repo, "a", 2, segno)
    report = run_verify(repo)
    assert report.ok, faults_by_backup(report)
    assert report.backups[0].recoverable_to == wal.segment_name(2, 6, SEG)
    # Timeline 1's segment before the switch is needed.
    repo.backend.delete(layout.wal_key("a", wal.segment_name(1, 3, SEG)))
    faults = faults_by_backup(run_verify(repo))
    assert wal.segment_name(1, 3, SEG) in faults["20260101-000000F"][0]


def test_recovery_path_follows_the_newest_descendant() -> None:
    names = [wal.segment_name(1, n, SEG) for n in range(1, 6)] + [wal.segment_name(2, n, SEG) for n in (3, 4)]
    names += [wal.segment_name(3, n, SEG) for n in (4, 6)]  # 3 branched from 2 in segment 4; 5 missing
    histories = {2: parse_history("1\t0/3000000\tx\n"), 3: parse_history("1\t0/3000000\tx\n2\t0/4000028\ty\n")}
    archive = WalArchive(names, histories, SEG)
    path = archive.recovery_path(1, 1 * SEG + 40)
    assert [(s.tli, s.lo, s.hi) for s in path] == [(1, 1, 2), (2, 3, 3), (3, 4, 6)]
    assert archive.missing(path) == [(3, 5)]
    # A backup taken on timeline 1 after the branch point is not on timeline 2's path.
    assert [(s.tli, s.lo, s.hi) for s in archive.recovery_path(1, 4 * SEG)] == [(1, 4, 5)]
    assert archive.last() == wal.segment_name(3, 6, SEG)


def test_retention_rules() -> None:
    now = parse_time("2026-03-31T12:00:00Z")
    day = 86400.0
    backups = [(f"b{i:02d}", now - i * day / 2) for i in range(40)]  # two a day for 20 days
    assert set(retained(backups, set(), Policy(keep_last=3), now)) == {"b00", "b01", "b02"}
    within = retained(backups, set(), Policy(keep_within=2 * 86400), now)
    assert set(within) == {f"b{i:02d}" for i in range(5)}
    daily = retained(backups, {"b39"}, Policy(keep_daily=3), now)
    # The newest of each of the last three days: 12:00 on the 31st, 30th and 29th.
    assert set(daily) == {"b00", "b02", "b04", "b39"} and daily["b39"] == ["pinned"]
    longer = [(f"b{i:02d}", now - i * day / 2) for i in range(80)]  # back to 2026-02-19
    assert set(retained(longer, set(), Policy(keep_monthly=2), now)) == {"b00", "b62"}  # b62: 2026-02-28 12:00
    weekly = retained(longer, set(), Policy(keep_weekly=2), now)  # 2026-03-31 is a Tuesday
    assert set(weekly) == {"b00", "b04"}  # b04: Sunday 2026-03-29 12:00, the end of the week before
    # The newest backup is always kept, even outside every window.
    assert list(retained([("old", now - 100 * day)], set(), Policy(keep_within=3600), now)) == ["old"]


def test_wal_expiry_keeps_what_kept_backups_need() -> None:
    repo = new_repo()
    now = parse_time("2026-01-10T00:00:00Z")
    old = write_backup(repo, "a", "20260101-000000F", {"f": data(1, 100)}, (2, 3), start_time="2026-01-01T00:00:00Z")
    mid = write_backup(repo, "a", "20260105-000000F", {"f": data(1, 100)}, (7, 8), start_time="2026-01-05T00:00:00Z")
    new = write_backup(repo, "a", "20260109-000000F", {"f": data(1, 100)}, (12, 12), start_time="2026-01-09T00:00:00Z")
    names = [wal.segment_name(1, n, SEG) for n in range(1, 15)] + ["00000002.history",
                                                                 wal.segment_name(1, 2, SEG) + ".00000028.backup"]
    doomed = wal_to_delete(names, [mid, new], SEG, None, now)
    assert doomed == [wal.segment_name(1, n, SEG) for n in range(1, 7)] + [names[-1]]
    # A 2-day PITR window: continuous WAL from the newest backup that stopped before it began;
    # older kept backups keep their own start..stop only.
    doomed = wal_to_delete(names, [old, mid, new], SEG, 2 * 86400, now)
    kept = sorted(set(names) - set(doomed))
    assert kept == sorted([wal.segment_name(1, n, SEG) for n in (2, 3, 7, 8, 9, 10, 11, 12, 13, 14)]
                          + ["00000002.history", names[-1]])


def test_progress_line_and_quiet_when_not_a_terminal() -> None:
    bar = Progress("verify", 1000, io.StringIO(), clock=time.monotonic() - 2)
    bar.done = 500
    line = bar.line(time.monotonic())
    assert "50%" in line and "/s" in line and "ETA 0:00:0" in line
    quiet = progress("auto", "backup", 10, io.StringIO())
    quiet.add(5)
    assert not quiet.enabled
    stream = io.StringIO()
    loud = progress("always", "backup", 10, stream)
    loud.add(10)
    loud.close()
    assert "100%" in stream.getvalue()


def test_unindexed_truncated_and_mislabelled_blocks() -> None:
    """Each per-block fault names only the backups that need the block, and its files."""
    from pgvault.pipeline import codecs, envelope
    from pgvault.pipeline.envelope import Kind

    # An index object gone: its blocks are missing for the backup that needs them.
    backend, repo = two_backups()
    pack = location_of(repo, 3, 50_000).pack  # "new": second backup only
    backend.delete(layout.index_key(pack))
    faults = faults_by_backup(run_verify(repo))
    assert list(faults) == ["20260102-000000F"], faults
    assert any("blocks missing from the repository index" in f and "files new" in f for f in faults["20260102-000000F"])

    # A pack cut short: the blocks past its end.
    backend, repo = two_backups()
    loc = location_of(repo, 2, 50_000)  # "old": first backup only
    raw = backend.get(layout.pack_key(loc.pack))
    backend.put(layout.pack_key(loc.pack), raw[: loc.offset + 10])
    report = run_verify(repo)
    assert not report.ok and report.error().exit_code == 5  # type: ignore[union-attr]
    assert any(f"pack {loc.pack} is truncated" in f for f in sum(faults_by_backup(report).values(), []) + report.faults)

    # A block whose envelope is valid for its id but holds other content: only --rehash sees it.
    backend, repo = two_backups()
    loc = location_of(repo, 2, 50_000)
    block_id = repo.keys.block_id(data(2, 50_000)[:4096])
    forged = envelope.seal(repo.keys, Kind.BLOCK, bytes(4096), block_id, codecs.Codec.NONE)
    raw = bytearray(backend.get(layout.pack_key(loc.pack)))
    assert len(forged) == loc.length  # both stored raw (incompressible)
    raw[loc.offset : loc.offset + loc.length] = forged
    backend.put(layout.pack_key(loc.pack), bytes(raw))
    assert run_verify(repo).ok  # authentic envelope: only re-hashing can tell
    faults = faults_by_backup(run_verify(repo, rehash=True))
    assert list(faults) == ["20260101-000000F"], faults
    assert "do not match their ids" in faults["20260101-000000F"][0] and "old" in faults["20260101-000000F"][0]


def test_blocks_no_backup_uses_are_checked_by_a_full_run() -> None:
    """A full run of every backup checks every indexed block (new backups dedup against the
    index, so a damaged block nobody uses yet is damage too), and reports those as faults of
    the repository, not of a backup; verify --set reads only what its backup uses."""
    backend, repo = two_backups()
    loc = location_of(repo, 3, 50_000)  # "new": second backup only
    backend.delete(layout.manifest_key("a", "20260102-000000F"))  # expired, not yet collected
    raw = bytearray(backend.get(layout.pack_key(loc.pack)))
    raw[loc.offset + 100] ^= 0x01
    backend.put(layout.pack_key(loc.pack), bytes(raw))
    report = run_verify(repo)
    assert not faults_by_backup(report) and report.backups[0].ok
    assert [f for f in report.faults if "fail authentication" in f and "no backup uses" in f], report.faults
    assert report.error() is not None and report.error().exit_code == 5  # type: ignore[union-attr]
    repo.forget_index()
    one = VerifyReport("full", None)
    Verifier(repo, one, 2, "never").run([repo.stanza_info("a")], "20260101-000000F")
    assert one.ok, one.faults

    # Its pack gone: the repository fault names the pack, as when a full run of old found it.
    backend.delete(layout.pack_key(loc.pack))
    report = run_verify(repo)
    assert not faults_by_backup(report)
    assert [f for f in report.faults if f"pack {loc.pack} is missing but the index lists" in f], report.faults
