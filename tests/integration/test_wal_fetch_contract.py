"""wal-fetch's exit codes are a contract with PostgreSQL's restore_command handling.

Exit 1 means "this file is not in the archive": recovery ends there and the server
promotes. Any other failure must stop recovery instead (status above 125), or a
repository that is briefly unreadable would end recovery early, at the wrong point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.support.pgserver import PgServer, PgServerError

pytestmark = pytest.mark.integration


def test_fetch_exit_codes(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    vault = make_vault()
    source = archived_cluster(pg_server_factory, one_pg_major, vault)
    archived = source.switch_wal_and_wait_archived()
    dest = tmp_path / "segment"

    assert vault.run("wal-fetch", archived, str(dest)).returncode == 0
    assert dest.stat().st_size == 16 << 20
    assert vault.run("wal-fetch", "0000000100000099000000FF", str(dest), check=False).returncode == 1
    assert vault.run("wal-fetch", "00000009.history", str(dest), check=False).returncode == 1

    # A promoted standby archives its old timeline's last segment as .partial; a .backup
    # history file and a timeline .history file are small. All round-trip unchanged.
    partial = tmp_path / (archived + ".partial")
    partial.write_bytes(dest.read_bytes())
    backup_file = tmp_path / f"{archived}.00000028.backup"
    backup_file.write_text("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n")
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000158\tno recovery target specified\n")
    for path in (partial, backup_file, history):
        vault.run("wal-push", str(path))
        vault.run("wal-push", str(path))  # the same content again is fine
        fetched = tmp_path / "fetched"
        vault.run("wal-fetch", path.name, str(fetched))
        assert fetched.read_bytes() == path.read_bytes()

    group = next((vault.repo / "stanzas" / "main" / "wal").glob("00000001*"))
    group.chmod(0)
    try:
        proc = vault.run("wal-fetch", archived, str(dest), check=False)
        assert proc.returncode > 125 and "cannot read" in proc.stderr, proc.stderr
        # Absent, but in the unreadable directory: pgvault cannot know, so it must not say 1.
        proc = vault.run("wal-fetch", group.name + "000000FE", str(dest), check=False)
        assert proc.returncode > 125, proc.stderr
    finally:
        group.chmod(0o700)

    wrong_stanza = Vault(repo=vault.repo, stanza="other")
    assert wrong_stanza.run("wal-fetch", archived, str(dest), check=False).returncode > 125
    missing_repo = Vault(repo=tmp_path / "no-such-repo")
    assert missing_repo.run("wal-fetch", archived, str(dest), check=False).returncode > 125
    assert vault.run("wal-fetch", "not-a-wal-name", str(dest), check=False).returncode > 125
    assert vault.run("wal-fetch", archived, check=False).returncode > 125  # usage error


def test_unreadable_archive_stops_recovery_instead_of_promoting(
    one_pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    source = archived_cluster(pg_server_factory, one_pg_major, vault)
    source.psql("create table t as select generate_series(1, 1000) as n")
    vault.run(f"--pg-conninfo={source.conninfo()}", "backup")
    source.psql("insert into t select generate_series(1001, 2000)")
    source.switch_wal_and_wait_archived()

    target = tmp_path / "restored"
    vault.run("restore", f"--pg-data={target}")
    groups = list((vault.repo / "stanzas" / "main" / "wal").glob("00000001*"))
    for group in groups:
        group.chmod(0)
    restored = pg_wrap_factory(target, conf={"archive_mode": "off"}, start=False)
    try:
        with pytest.raises(PgServerError):
            restored.start(timeout=60)
    finally:
        for group in groups:
            group.chmod(0o700)
    log = restored.log_file.read_text()
    assert "restore_command" in log or "could not restore" in log, log[-2000:]
    assert (target / "recovery.signal").exists(), "recovery ended and the server promoted"
    assert not list((target / "pg_wal").glob("*.history")), "a new timeline was started"

    # Once the archive is readable again, recovery resumes and reaches the end.
    restored.start()
    restored.wait_for_recovery_end()
    assert restored.psql("select count(*) from t") == "2000"
