"""Delta restore over a used data directory gives exactly what a fresh restore gives."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.integration.test_roundtrip import table_digest
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration

TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "in_tablespace")


def tree(root: Path) -> dict[str, tuple[str, int, str]]:
    """relative path -> (type, mode, content digest or link target), tablespaces followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("l", 0, "")  # tablespace links differ by design (remapped)
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("d", stat.S_IMODE(st.st_mode), "")
            elif rel != "tablespace_map":  # names the remapped tablespace location
                found[rel] = ("f", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def test_delta_restore_matches_fresh_restore(
    pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    source = archived_cluster(pg_server_factory, pg_major, vault)
    ts_dir = tmp_path / "ts"
    ts_dir.mkdir()
    source.pgbench("-i", "-s", "3", "-q")
    source.psql(
        f"create tablespace extra location '{ts_dir}';"
        "create table in_tablespace tablespace extra as select g as id, md5(g::text) as t from generate_series(1, 20000) g;"
    )
    backup_id = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()
    expected = {t: table_digest(source, t) for t in TABLES}
    database_size = json.loads(vault.run("info", "--output=json").stdout)[0]["backups"][0]["database_size"]

    # A used copy: restored, run, changed (updates, a dropped and a new table), stopped,
    # then tampered with by hand.
    target = tmp_path / "target"
    restore = ["restore", f"--set={backup_id}", "--type=immediate", "--target-action=promote"]
    vault.run(*restore, f"--pg-data={target}", f"--tablespace-map-all={tmp_path / 'ts_target'}")
    used = pg_wrap_factory(target, conf={"archive_mode": "off"})
    used.wait_for_recovery_end()
    used.pgbench("-n", "-t", "200", "-c", "2")
    used.psql("drop table pgbench_history; create table newcomer as select generate_series(1, 50000) as n;"
              "update in_tablespace set t = 'x' where id % 50 = 0; checkpoint;")
    used.stop()
    (target / "junk.txt").write_text("left behind")
    (target / "base" / "junk_dir").mkdir()
    accounts = next(p for p in (target / "base").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20)
    accounts.chmod(0o644)
    with open(accounts, "r+b") as f:
        f.truncate(accounts.stat().st_size // 2)
    (target / "PG_VERSION").chmod(0o640)

    fresh = tmp_path / "fresh"
    vault.run(*restore, f"--pg-data={fresh}", f"--tablespace-map-all={tmp_path / 'ts_fresh'}")
    proc = vault.run(*restore, f"--pg-data={target}", f"--tablespace-map-all={tmp_path / 'ts_target'}",
                     "--delta", "--output=json")
    result = json.loads(proc.stdout)
    assert result["delta"] is True and result["backup"] == backup_id
    assert result["bytes_compared"] > database_size / 2
    assert 0 < result["bytes"] < database_size / 2, result

    assert tree(target) == tree(fresh)
    restored = pg_wrap_factory(target, conf={"archive_mode": "off"})
    restored.wait_for_recovery_end()
    for table in TABLES:
        assert table_digest(restored, table) == expected[table], table
    assert restored.psql("select count(*) from pg_class where relname = 'newcomer'") == "0"
    restored.run_bin("pg_amcheck", "--all", "--install-missing", "--heapallindexed", "-h", str(restored.socket_dir),
                     "-p", str(restored.port), "-U", "postgres")
    restored.stop()
    assert "Bad checksums:  0" in restored.run_bin("pg_checksums", "--check", "-D", str(target)).stdout


def test_delta_refuses_running_or_foreign_directories(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    vault = make_vault()
    source = archived_cluster(pg_server_factory, one_pg_major, vault)
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup")

    proc = vault.run("restore", f"--pg-data={source.data_dir}", "--delta", check=False)
    assert proc.returncode == 10 and "running" in proc.stderr
    assert (source.data_dir / "global" / "pg_control").exists()

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    proc = vault.run("restore", f"--pg-data={foreign}", "--delta", check=False)
    assert proc.returncode == 10 and "not a PostgreSQL data directory" in proc.stderr
    assert (foreign / "thesis.tex").read_text() == "years of work"

    proc = vault.run("restore", f"--pg-data={foreign}", "--delta", "--force", check=False)
    assert proc.returncode == 3 and (foreign / "thesis.tex").exists()
