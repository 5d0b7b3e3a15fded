"""Backup and restore round trips on real servers, proven with PostgreSQL's own tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration

TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "in_tablespace")


def table_digest(server: PgServer, table: str) -> str:
    return server.psql(f"select count(*) || ':' || coalesce(md5(string_agg(t::text, ',' order by t::text)), '') from {table} t")


@pytest.mark.parametrize(
    "encrypted, index_file", [(False, False), (True, False), (False, True)], ids=["plain", "encrypted", "index-file"]
)
def test_backup_restore_roundtrip(
    pg_major: int,
    encrypted: bool,
    index_file: bool,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """index-file: the backup's and the restore's block index moves to the index file after
    64 records (by default after 128k, more than a test cluster has)."""
    if index_file:
        monkeypatch.setenv("PGVAULT_INDEX_MEMORY_RECORDS", "64")
    vault = make_vault(encrypted=encrypted)
    source = archived_cluster(pg_server_factory, pg_major, vault)
    ts_dir = tmp_path / "tablespace"
    ts_dir.mkdir()
    source.pgbench("-i", "-s", "2", "-q")
    source.psql(
        f"create tablespace extra location '{ts_dir}';"
        "create table in_tablespace (id int primary key, payload text) tablespace extra;"
        "insert into in_tablespace select g, repeat(md5(g::text), 20) from generate_series(1, 20000) g;"
        "create index on in_tablespace (payload) tablespace extra;"
        "create unlogged table scratch as select generate_series(1, 5000) as n;"
    )
    backup_id = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()

    # Changes after the backup must come back through WAL replay from the archive.
    source.pgbench("-t", "300", "-c", "2", "-n")
    source.psql("update in_tablespace set payload = 'changed' where id % 97 = 0;")
    source.switch_wal_and_wait_archived()
    expected = {t: table_digest(source, t) for t in TABLES}

    info = json.loads(vault.run("info", "--output=json").stdout)
    backup = info[0]["backups"][0]
    assert backup["id"] == backup_id
    assert backup["pg_version"] // 10000 == pg_major
    assert backup["database_size"] > 20_000_000 and 0 < backup["repo_bytes_added"] < backup["database_size"]
    assert backup["timeline"] == 1 and backup["start_lsn"] and backup["stop_lsn"]
    assert info[0]["encrypted"] is encrypted

    target = tmp_path / "restored"
    ts_oid = source.psql("select oid from pg_tablespace where spcname = 'extra'")
    vault.run("restore", f"--pg-data={target}", f"--tablespace-map={ts_oid}={tmp_path / 'restored_ts'}")
    assert (target / "recovery.signal").exists()
    assert (tmp_path / "restored_ts").is_dir()
    assert oct((target / "global" / "pg_control").stat().st_mode & 0o777) == oct(0o600)

    restored = pg_wrap_factory(target, conf={"archive_mode": "off"})
    restored.wait_for_recovery_end()
    for table in TABLES:
        assert table_digest(restored, table) == expected[table], table
    assert restored.psql("select count(*) from scratch") == "0"  # unlogged: reset by recovery
    assert restored.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'extra'") == str(
        tmp_path / "restored_ts"
    )
    restored.run_bin("pg_amcheck", "--all", "--install-missing", "--heapallindexed", "-h", str(restored.socket_dir),
                     "-p", str(restored.port), "-U", "postgres")
    restored.stop()
    checked = restored.run_bin("pg_checksums", "--check", "-D", str(target))
    assert "Bad checksums:  0" in checked.stdout


@pytest.mark.parametrize("index_file", [False, True], ids=["index-in-memory", "index-file"])
def test_second_backup_stores_only_new_blocks(
    one_pg_major: int,
    index_file: bool,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """index-file: dedup against blocks found in the index file (see the round trip above)."""
    if index_file:
        monkeypatch.setenv("PGVAULT_INDEX_MEMORY_RECORDS", "64")
    vault = make_vault()
    source = archived_cluster(pg_server_factory, one_pg_major, vault)
    source.pgbench("-i", "-s", "5", "-q")
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup")
    source.psql("update pgbench_accounts set abalance = 1 where aid % 5000 = 0;")
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup")
    first, second = json.loads(vault.run("info", "--output=json").stdout)[0]["backups"]
    # 100 scattered rows touch ~100 heap blocks plus index, FSM/VM and pg_xact blocks.
    assert first["blocks_new"] > first["blocks_total"] / 2
    assert second["blocks_new"] < second["blocks_total"] / 5
    assert second["repo_bytes_added"] < first["repo_bytes_added"] / 2


def test_page_checksum_failures_are_recorded(
    one_pg_major: int, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    vault = make_vault()
    source = archived_cluster(pg_server_factory, one_pg_major, vault)
    source.psql("create table victim as select g as id, md5(g::text) as t from generate_series(1, 50000) g; checkpoint;")
    relpath = source.psql("select pg_relation_filepath('victim')")
    source.stop()
    data_file = source.data_dir / relpath
    raw = bytearray(data_file.read_bytes())
    raw[5 * 8192 + 4000] ^= 0xFF  # inside the tuples of page 5
    data_file.write_bytes(bytes(raw))
    source.start()
    proc = vault.run(f"--pg-conninfo={source.conninfo()}", "backup")
    assert "1 page checksum failures" in proc.stderr
    backup = json.loads(vault.run("info", "--output=json").stdout)[0]["backups"][0]
    assert backup["checksum_failures"] == 1
    assert "checksum failures: 1" in vault.run("info").stdout
