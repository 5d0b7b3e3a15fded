"""--archive-async: a background pusher and a prefetching fetcher, on real servers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault
from tests.integration.test_roundtrip import table_digest
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def test_async_archive_and_prefetching_recovery(
    pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault(encrypted=True)
    spool = tmp_path / "spool"
    async_args = f"--archive-async --spool-path={spool}"
    source = pg_server_factory(pg_major, archive_command=f"{vault.command_line()} {async_args} wal-push %p",
                               extra_conf={"max_wal_size": "64MB"})
    vault.run(f"--pg-conninfo={source.conninfo()}", "stanza-create")
    source.pgbench("-i", "-s", "2", "-q")
    backup = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()
    start = source.psql("select pg_current_wal_lsn()")
    source.pgbench("-n", "-c", "2", "-t", "2000")
    source.psql("create table big as select g, md5(g::text) from generate_series(1, 600000) g")
    segments = int(source.psql(f"select floor((pg_current_wal_lsn() - '{start}') / (16 * 1024 * 1024))"))
    assert segments >= 4, segments
    source.switch_wal_and_wait_archived()
    archiver = source.psql("select archived_count, failed_count from pg_stat_archiver").split("|")
    assert int(archiver[0]) >= segments and archiver[1] == "0", archiver
    expected = {t: table_digest(source, t) for t in ("pgbench_accounts", "pgbench_history", "big")}

    # What an earlier recovery (of a stanza since recreated, say) left queued must not reach
    # PostgreSQL: the shell hands queued files over unchecked, so restore empties the queue.
    stale = spool / "main" / "fetch"
    stale.mkdir(parents=True, exist_ok=True)
    first = source.psql(f"select pg_walfile_name('{start}')")
    second = source.psql(f"select pg_walfile_name('{start}'::pg_lsn + 16777216)")
    for name in (first, second):
        (stale / name).write_bytes(b"\xde\xad" * (8 << 20))
    target = tmp_path / "restored"
    vault.run("restore", f"--set={backup}", f"--pg-data={target}", "--archive-async", f"--spool-path={spool}")
    assert "--archive-async" in (target / "postgresql.auto.conf").read_text()
    assert not (stale / first).exists()
    restored = pg_wrap_factory(target, conf={"archive_mode": "off"})
    restored.wait_for_recovery_end()
    for table, digest in expected.items():
        assert table_digest(restored, table) == digest, table
    log = (spool / "main" / "fetch" / "fetcher.log")
    assert not log.exists() or "Error" not in log.read_text()


def test_async_push_reports_failures_and_recovers(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    vault = make_vault()
    source = pg_server_factory(one_pg_major, archive_command=f"{vault.command_line()} wal-push %p")
    vault.run(f"--pg-conninfo={source.conninfo()}", "stanza-create")
    segment = source.switch_wal_and_wait_archived()
    (vault.repo / "stanzas" / "main" / "wal" / segment[:16] / segment).unlink()

    # A copy of pg_wal with one file marked ready, as the archiver leaves it.
    wal_dir = tmp_path / "pg_wal"
    (wal_dir / "archive_status").mkdir(parents=True)
    shutil.copy(source.data_dir / "pg_wal" / segment, wal_dir / segment)
    (wal_dir / "archive_status" / f"{segment}.ready").touch()
    spool = tmp_path / "spool"
    push = ["--archive-async", f"--spool-path={spool}", "--archive-timeout=20", "wal-push", str(wal_dir / segment)]

    walgroup = vault.repo / "stanzas" / "main" / "wal" / segment[:16]
    walgroup.chmod(0o500)  # the repository refuses writes
    try:
        proc = vault.run(*push, check=False)
        assert proc.returncode not in (0, 1) and "asynchronous push" in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
    finally:
        walgroup.chmod(0o700)
    vault.run(*push)
    assert (walgroup / segment).exists()
    fetched = tmp_path / "fetched"
    vault.run("wal-fetch", segment, str(fetched), "--archive-async", f"--spool-path={spool}")
    assert fetched.read_bytes() == (wal_dir / segment).read_bytes()
    missing = vault.run("wal-fetch", segment[:16] + "000000FE", str(fetched), "--archive-async",
                        f"--spool-path={spool}", check=False)
    assert missing.returncode == 1, missing.stderr
    assert os.stat(spool / "main" / "fetch").st_mode & 0o077 == 0


def test_shell_restore_command_hands_queued_segments_over(
    one_pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    """fetch_queue.shell_restore_command: queued segments go to PostgreSQL by mv alone, the
    prefetcher follows recovery by noticing them taken, and pgvault itself runs only for the
    rest (the first file, absent ones); recovery ends with the source's data."""
    from pgvault.ops.fetch_queue import shell_restore_command
    from pgvault.pg.recovery import quote
    from pgvault.pg.wal import parse_segment_name

    vault = make_vault()
    spool = tmp_path / "spool"
    source = pg_server_factory(one_pg_major, archive_command=f"{vault.command_line()} wal-push %p",
                               extra_conf={"max_wal_size": "64MB"})
    vault.run(f"--pg-conninfo={source.conninfo()}", "stanza-create")
    source.pgbench("-i", "-s", "1", "-q")
    backup = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()
    start = source.psql("select pg_current_wal_lsn()")
    source.psql("create table big as select g, md5(g::text) from generate_series(1, 800000) g")
    segments = int(source.psql(f"select floor((pg_current_wal_lsn() - '{start}') / (16 * 1024 * 1024))"))
    assert segments >= 4, segments
    source.switch_wal_and_wait_archived()
    expected = table_digest(source, "big")

    target = tmp_path / "restored"
    vault.run("restore", f"--set={backup}", f"--pg-data={target}", "--archive-async", f"--spool-path={spool}",
              "--archive-get-queue-max=64")
    auto = target / "postgresql.auto.conf"
    calls = tmp_path / "pgvault-calls"
    lines = auto.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("restore_command = '"):
            command = line[len("restore_command = '"):-1].replace("''", "'")
            # restore writes this form itself; wrapped once more, pgvault's own runs are counted
            assert command.startswith(shell_restore_command(str(spool / "main" / "fetch"), "")), command
            shell = shell_restore_command(str(spool / "main" / "fetch"), f"echo %f >> {calls}; {command}")
            lines[i] = f"restore_command = {quote(shell)}"
    auto.write_text("\n".join(lines) + "\n")
    restored = pg_wrap_factory(target, conf={"archive_mode": "off"})
    restored.wait_for_recovery_end()
    assert table_digest(restored, "big") == expected
    # pgvault ran for the first segment and for ones not queued yet; most went by mv alone.
    last = source.psql("select last_archived_wal from pg_stat_archiver")
    started = [n for n in calls.read_text().split() if len(n) == 24 and n <= last]
    replayed = parse_segment_name(last, 16 << 20)[1] - parse_segment_name(min(started), 16 << 20)[1] + 1
    assert len(set(started)) <= replayed // 2, (started, replayed)
    log = spool / "main" / "fetch" / "fetcher.log"
    assert not log.exists() or "Error" not in log.read_text()
