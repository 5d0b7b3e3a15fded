"""Point-in-time recovery on real servers: every target type, inclusive and exclusive.

A table of numbered batches (one transaction each, with its xid and commit timestamp) is
filled while pgbench keeps the cluster busy; each restore must hold exactly the batches up
to its target. Backups are taken between batches, so choosing the right backup for a
target is checked too.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault
from tests.support.pgserver import PgServer, PgServerError

pytestmark = pytest.mark.integration


@dataclass
class Batch:
    number: int
    xid: int
    committed: str  # commit timestamp as the server prints it


@dataclass
class History:
    source: PgServer
    vault: Vault
    first_backup: str
    second_backup: str  # taken after batch 3
    batches: dict[int, Batch]
    lsn_before_9: str  # insert position right before batch 9's commit record


def _batch(server: PgServer, number: int) -> Batch:
    server.psql(f"insert into marks (batch) select {number} from generate_series(1, 5)")
    xid, committed = server.psql(
        f"select txid, pg_xact_commit_timestamp(txid::text::xid) from marks where batch = {number} limit 1"
    ).split("|")
    return Batch(number, int(xid), committed)


def _pgbench_load(server: PgServer, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(server.bin("pgbench")), "-n", "-c", "2", "-T", str(seconds), "postgres"],
        env=server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def build_history(major: int, vault: Vault, make_server: Callable[..., PgServer]) -> History:
    source = make_server(
        major,
        archive_command=f"{vault.command_line()} wal-push %p",
        extra_conf={"track_commit_timestamp": "on"},
    )
    conninfo = f"--pg-conninfo={source.conninfo()}"
    vault.run(conninfo, "stanza-create")
    source.pgbench("-i", "-s", "1", "-q")
    source.psql("create table marks (batch int, txid bigint default txid_current(), at timestamptz default clock_timestamp())")
    first = vault.run(conninfo, "backup").stdout.strip()
    load = _pgbench_load(source, 600)
    try:
        batches = {n: _batch(source, n) for n in (1, 2, 3)}
        second = vault.run(conninfo, "backup").stdout.strip()
        for n in (4, 5):
            batches[n] = _batch(source, n)
        source.psql("select pg_create_restore_point('after_batch_5')")
        for n in (6, 7, 8):
            time.sleep(0.05)
            batches[n] = _batch(source, n)
    finally:
        load.terminate()
        load.wait(timeout=60)
    # Batch 9 alone on a quiet server, so its commit record starts at the insert position
    # read just before COMMIT: an LSN target can then stop right before or after it.
    out = source.psql(
        "begin; insert into marks (batch) select 9 from generate_series(1, 5);"
        "select pg_current_wal_insert_lsn(); commit;"
    )
    lsn_before_9 = out.splitlines()[-1]
    batches[9] = Batch(9, 0, "")
    batches[10] = _batch(source, 10)
    source.switch_wal_and_wait_archived()
    return History(source, vault, first, second, batches, lsn_before_9)


def wait_until_paused(server: PgServer, timeout: float = 60) -> None:
    """Hot standby answers as soon as it is consistent, which may be before the target."""
    deadline = time.monotonic() + timeout
    while server.psql("select pg_get_wal_replay_pause_state()") != "paused":
        assert time.monotonic() < deadline, "recovery never paused at the target"
        time.sleep(0.2)
    assert server.psql("select pg_is_in_recovery()") == "t"


def restore_and_count(
    history: History, target_dir: Path, wrap: Callable[..., PgServer], *args: str, action: str = "promote"
) -> tuple[str, int]:
    """Restore with args, start, and return (backup id used, highest batch present)."""
    extra = [] if "--type=default" in args else [f"--target-action={action}"]
    proc = history.vault.run("restore", f"--pg-data={target_dir}", "--force", "--output=json", *args, *extra)
    used = json.loads(proc.stdout)["backup"]
    server = wrap(target_dir, conf={"archive_mode": "off"})
    try:
        if action == "promote":
            server.wait_for_recovery_end()
        else:
            wait_until_paused(server)
        batches = server.psql("select coalesce(max(batch), 0) || ',' || count(distinct batch) from marks").split(",")
        highest, distinct = int(batches[0]), int(batches[1])
        assert distinct == highest, f"batches are not contiguous: max {highest}, {distinct} distinct"
        return used, highest
    finally:
        server.stop()


def test_every_recovery_target(
    pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    history = build_history(pg_major, make_vault(), pg_server_factory)
    b = history.batches
    target = tmp_path / "restored"

    def count(*args: str, action: str = "promote") -> tuple[str, int]:
        return restore_and_count(history, target, pg_wrap_factory, *args, action=action)

    # time: inclusive and exclusive at a commit timestamp; an early target picks the first backup.
    assert count("--type=time", f"--target={b[2].committed}") == (history.first_backup, 2)
    assert count("--type=time", f"--target={b[2].committed}", "--target-exclusive") == (history.first_backup, 1)
    assert count("--type=time", f"--target={b[6].committed}") == (history.second_backup, 6)
    # xid
    assert count("--type=xid", f"--target={b[7].xid}") == (history.second_backup, 7)
    assert count("--type=xid", f"--target={b[7].xid}", "--target-exclusive") == (history.second_backup, 6)
    # lsn: batch 9's commit record starts exactly at the target
    assert count("--type=lsn", f"--target={history.lsn_before_9}") == (history.second_backup, 9)
    assert count("--type=lsn", f"--target={history.lsn_before_9}", "--target-exclusive") == (history.second_backup, 8)
    # name
    assert count("--type=name", "--target=after_batch_5") == (history.second_backup, 5)
    # immediate: consistent at the end of the chosen backup, taken after batch 3
    assert count("--type=immediate", f"--set={history.second_backup}") == (history.second_backup, 3)
    assert count("--type=immediate", f"--set={history.first_backup}") == (history.first_backup, 0)
    # default: the whole archive
    assert count("--type=default") == (history.second_backup, 10)
    # pause: the server stays in recovery, paused at the target
    assert count("--type=xid", f"--target={b[4].xid}", action="pause") == (history.second_backup, 4)


def test_target_action_pause_and_shutdown(
    one_pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    source = pg_server_factory(one_pg_major, archive_command=f"{vault.command_line()} wal-push %p")
    vault.run(f"--pg-conninfo={source.conninfo()}", "stanza-create")
    source.psql("create table t as select 1 as n")
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup")
    source.psql("insert into t values (2)")
    lsn = source.psql("select pg_current_wal_insert_lsn()")
    source.psql("insert into t values (3)")
    source.switch_wal_and_wait_archived()

    paused_dir = tmp_path / "paused"
    vault.run("restore", f"--pg-data={paused_dir}", "--type=lsn", f"--target={lsn}", "--target-action=pause")
    paused = pg_wrap_factory(paused_dir, conf={"archive_mode": "off"})
    wait_until_paused(paused)
    assert paused.psql("select string_agg(n::text, ',' order by n) from t") == "1,2"
    paused.stop()

    down_dir = tmp_path / "down"
    vault.run("restore", f"--pg-data={down_dir}", "--type=lsn", f"--target={lsn}", "--target-action=shutdown")
    down = pg_wrap_factory(down_dir, conf={"archive_mode": "off"}, start=False)
    try:
        down.start()
    except PgServerError:
        pass  # it may already have shut down before pg_ctl saw it ready
    deadline = time.monotonic() + 60
    while (down_dir / "postmaster.pid").exists():
        assert time.monotonic() < deadline, "the server did not shut down at the target"
        time.sleep(0.2)
    control = down.run_bin("pg_controldata", "-D", str(down_dir)).stdout
    assert "shut down in recovery" in control


def test_unreachable_targets_fail_before_writing(
    one_pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    source = pg_server_factory(one_pg_major, archive_command=f"{vault.command_line()} wal-push %p")
    vault.run(f"--pg-conninfo={source.conninfo()}", "stanza-create")
    before = source.psql("select now()")
    time.sleep(0.05)
    source.psql("create table t as select 1 as n")
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup")
    for _ in range(3):
        source.psql("insert into t select generate_series(1, 1000)")
        source.switch_wal_and_wait_archived()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("operator's file")

    def fails(code: int, words: str, *args: str) -> None:
        proc = vault.run("restore", f"--pg-data={target}", "--force", *args, check=False)
        assert proc.returncode == code, proc.stderr
        assert words in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert sorted(p.name for p in target.iterdir()) == ["keep.txt"], "restore wrote before failing"

    fails(10, "before the end of the oldest backup", "--type=time", f"--target={before}")
    fails(10, "is in the future", "--type=time", "--target=2999-01-01 00:00:00+00")
    fails(10, "beyond the end of the archive", "--type=lsn", "--target=FF/0")
    fails(3, "is not a time", "--type=time", "--target=yesterday at noon")
    fails(3, "is not an LSN", "--type=lsn", "--target=12345")
    fails(3, "is not a transaction id", "--type=xid", "--target=abc")
    fails(3, "needs --target", "--type=xid")
    fails(3, "must be current, latest or a timeline number", "--target-timeline=newest")
    fails(10, "timeline 7 is unknown", "--target-timeline=7")
    fails(3, "--target-exclusive is only valid", "--type=name", "--target=x", "--target-exclusive")

    # A segment missing in the middle of the archive: a default restore would stop there.
    wal_objects = sorted(p for p in (vault.repo / "stanzas" / "main" / "wal").rglob("*") if p.is_file() and len(p.name) == 24)
    backup = json.loads(vault.run("info", "--output=json").stdout)[0]["backups"][0]
    later = [p for p in wal_objects if p.name > backup["stop_wal"]]
    assert len(later) >= 2
    later[0].unlink()
    fails(9, f"WAL segment {later[0].name} is missing from the archive", "--type=default")
