"""PG17+ WAL-summary incrementals: only changed pages travel, yet every backup restores alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.integration.test_roundtrip import table_digest
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def test_summary_incremental_restores_alone(
    pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    if pg_major < 17:
        pytest.skip("INCREMENTAL base backups need PostgreSQL 17")
    vault = make_vault(encrypted=True)
    source = pg_server_factory(pg_major, archive_command=f"{vault.command_line()} wal-push %p",
                               extra_conf={"summarize_wal": "on"})
    vault.run(f"--pg-conninfo={source.conninfo()}", "stanza-create")
    source.pgbench("-i", "-s", "3", "-q")
    source.psql("create table shrinking as select g from generate_series(1, 200000) g;"
                "create table doomed as select g from generate_series(1, 1000) g;")
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup", "--type=full")

    # Scattered updates, a new table, a truncated-by-vacuum table, a dropped table.
    source.psql(
        "update pgbench_accounts set abalance = abalance + 7 where aid % 20011 = 0;"
        "create table fresh as select g, md5(g::text) from generate_series(1, 30000) g;"
        "delete from shrinking where g > 1000; vacuum shrinking;"
        "drop table doomed; checkpoint;"
    )
    source.psql("select pg_sleep(1)")  # let the summarizer catch up with the checkpoint
    proc = vault.run(f"--pg-conninfo={source.conninfo()}", "--log-level=info", "backup", "--type=incr")
    assert "streaming every page" not in proc.stderr and "refused" not in proc.stderr, proc.stderr
    full, incr = json.loads(vault.run("info", "--output=json").stdout)[0]["backups"]
    assert incr["parent"] == full["id"] and full["parent"] is None
    assert incr["blocks_new"] < full["blocks_new"] / 5
    assert incr["database_size"] > 0.8 * full["database_size"]

    source.pgbench("-t", "100", "-n")
    source.switch_wal_and_wait_archived()
    tables = ("pgbench_accounts", "pgbench_history", "fresh", "shrinking")
    expected = {t: table_digest(source, t) for t in tables}
    target = tmp_path / "restored"
    vault.run("restore", f"--pg-data={target}", f"--set={incr['id']}")
    label = (target / "backup_label").read_text()
    assert "INCREMENTAL" not in label
    restored = pg_wrap_factory(target, conf={"archive_mode": "off"})
    restored.wait_for_recovery_end()
    for table in tables:
        assert table_digest(restored, table) == expected[table], table
    restored.run_bin("pg_amcheck", "--all", "--install-missing", "--heapallindexed", "-h", str(restored.socket_dir),
                     "-p", str(restored.port), "-U", "postgres")
    restored.stop()
    assert "Bad checksums:  0" in restored.run_bin("pg_checksums", "--check", "-D", str(target)).stdout


def test_incremental_falls_back_without_summaries(
    pg_major: int, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    if pg_major < 17:
        pytest.skip("INCREMENTAL base backups need PostgreSQL 17")
    vault = make_vault()
    source = archived_cluster(pg_server_factory, pg_major, vault)
    source.pgbench("-i", "-s", "1", "-q")
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup")
    proc = vault.run(f"--pg-conninfo={source.conninfo()}", "--log-level=info", "backup", "--type=incr")
    assert "streaming every page: summarize_wal is off" in proc.stderr
