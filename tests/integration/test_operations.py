"""check, verify, info for monitoring, and verify's damage reports, on real servers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def test_check_verify_and_monitoring_info(
    pg_major: int, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    vault = make_vault(encrypted=True)
    server = archived_cluster(pg_server_factory, pg_major, vault)
    server.pgbench("-i", "-s", "1", "-q")

    proc = vault.run(f"--pg-conninfo={server.conninfo()}", "check")
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["ok"] * 9, proc.stdout
    assert any("archiving end to end" in line and "reached the repository" in line for line in lines)

    vault.run(f"--pg-conninfo={server.conninfo()}", "backup")
    # Progress: forced on (stderr is a pipe here); the previous backup's size gives the total.
    proc = vault.run(f"--pg-conninfo={server.conninfo()}", "backup", "--progress=always")
    backup_id = proc.stdout.strip()
    assert "backup [" in proc.stderr and "/s" in proc.stderr, proc.stderr
    assert "backup" not in vault.run("info").stderr  # auto: quiet when stderr is not a terminal
    server.switch_wal_and_wait_archived()
    assert "verify [" in vault.run("verify", "--progress=always").stderr
    report = json.loads(vault.run("verify", "--output=json").stdout)
    assert report["ok"] and report["mode"] == "full" and report["packs_checked"] == report["packs_used"] > 0
    backup = report["backups"][-1]
    assert len(report["backups"]) == 2 and backup["id"] == backup_id and backup["ok"] and backup["recoverable_to"] >= backup["wal_stop"]

    info = json.loads(vault.run("info", "--output=json").stdout)[0]
    assert info["last_backup"]["id"] == backup_id and info["last_backup"]["database_size"] > 10_000_000
    assert 0 <= info["last_backup"]["age_seconds"] < 600
    assert info["wal_archive"]["last_archived"] >= backup["recoverable_to"]
    assert info["last_verify"]["ok"] is True and info["last_verify"]["mode"] == "full"
    assert info["checksum_failures"] == 0 and info["running"] == []
    assert "last verify:" in vault.run("info").stdout


def test_check_reports_each_failure_on_its_own_line(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    vault = make_vault(encrypted=True)
    server = archived_cluster(pg_server_factory, one_pg_major, vault)
    server.set_conf(archive_command="/bin/true")
    server.reload()
    proc = vault.run(f"--pg-conninfo={server.conninfo()}", "check", check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    status = {line[6:].split("  ")[0].strip(): line.split()[0] for line in proc.stdout.splitlines()}
    assert status["archive settings"] == "fail" and status["archiving end to end"] == "skip"
    assert status["passphrase"] == "ok" and status["server with REPLICATION"] == "ok"

    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    proc = Vault(vault.repo, vault.stanza, wrong).run(f"--pg-conninfo={server.conninfo()}", "check", check=False)
    assert proc.returncode == 6 and "fail  passphrase" in proc.stdout and "skip  stanza" in proc.stdout

    proc = vault.run("--pg-conninfo=host=/nonexistent port=1", "check", check=False)
    assert proc.returncode == 8 and "fail  server with REPLICATION" in proc.stdout


def test_verify_names_the_backup_of_each_fault(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> None:
    vault = make_vault()
    server = archived_cluster(pg_server_factory, one_pg_major, vault)
    server.pgbench("-i", "-s", "2", "-q")
    first = vault.run(f"--pg-conninfo={server.conninfo()}", "backup").stdout.strip()
    server.psql("create table later as select g, md5(g::text) from generate_series(1, 200000) g")
    second = vault.run(f"--pg-conninfo={server.conninfo()}", "backup").stdout.strip()
    server.switch_wal_and_wait_archived()
    server.stop()
    vault.run("verify")
    pristine = tmp_path / "pristine"
    shutil.copytree(vault.repo, pristine)

    def damaged(name: str) -> Vault:
        repo = tmp_path / name
        shutil.copytree(pristine, repo)
        return Vault(repo, vault.stanza)

    # The newest pack holds the second backup's new blocks ('later'), not the first's.
    packs = sorted((p for p in (pristine / "packs").rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
    newest = packs[-1].relative_to(pristine)

    missing = damaged("missing-pack")
    (missing.repo / newest).unlink()
    proc = missing.run("verify", check=False)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert f"FAULT  main/{second}: pack {newest.name} is missing" in proc.stdout
    assert f"FAULT  main/{first}" not in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and second in proc.stderr

    flipped = damaged("flipped-byte")
    pack = flipped.repo / newest
    raw = bytearray(pack.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    pack.write_bytes(bytes(raw))
    proc = flipped.run("verify", check=False)
    assert proc.returncode == 5 and f"FAULT  main/{second}" in proc.stdout and "fail authentication" in proc.stdout
    # A sample that happens to miss the pack may pass; metadata-only cannot see flipped bytes.
    assert flipped.run("verify", "--metadata-only", check=False).returncode == 0

    gap = damaged("deleted-wal")
    manifest = json.loads(vault.run("info", "--output=json").stdout)[0]["backups"][1]
    segment = manifest["start_wal"]
    (gap.repo / "stanzas" / "main" / "wal" / segment[:16] / segment).unlink()
    proc = gap.run("verify", "--metadata-only", check=False)
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert f"FAULT  main/{second}: WAL {segment} is missing" in proc.stdout and "consistent state" in proc.stdout
    assert f"FAULT  main/{first}: WAL {segment} is missing" in proc.stdout and "point-in-time" in proc.stdout
    proc = gap.run("verify", f"--set={first}", check=False)
    assert proc.returncode == 9 and second not in proc.stdout
    info = json.loads(gap.run("info", "--output=json").stdout)[0]
    assert info["last_verify"]["ok"] is False and info["last_verify"]["failed_backups"] == [first]
