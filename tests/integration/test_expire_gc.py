"""expire and GC on real data: stanzas sharing blocks, pins, GC against a running backup, two
backups of one stanza at once, and GC killed (SIGKILL) mid-flight."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import CHECKOUT, Vault, archived_cluster
from tests.integration.test_roundtrip import table_digest
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def backup(vault: Vault, server: PgServer, *args: str) -> str:
    return vault.run(f"--pg-conninfo={server.conninfo()}", "backup", *args).stdout.strip()


def state(server: PgServer) -> str:
    return table_digest(server, "pgbench_accounts") + "/" + table_digest(server, "pgbench_history")


def restored_state(vault: Vault, backup_id: str, target: Path, wrap: Callable[..., PgServer]) -> str:
    """Restore to the backup's consistent point only (its content then equals the source's at
    the end of the backup, taken while the source was idle) and read the tables back."""
    proc = vault.run("restore", f"--pg-data={target}", f"--set={backup_id}", "--type=immediate",
                     "--target-action=promote", "--progress=always")
    assert "restore [####################] 100%" in proc.stderr, proc.stderr
    server = wrap(target, conf={"archive_mode": "off"})
    server.wait_for_recovery_end()
    result = state(server)
    server.stop()
    return result


def popen(vault: Vault, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pgvault", *vault.base_args(), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CHECKOUT)


def repo_wide(vault: Vault, *args: str) -> str:
    """A command over every stanza of the repository (no --stanza)."""
    proc = subprocess.run([sys.executable, "-m", "pgvault", f"--repo={vault.repo}", *args],
                          capture_output=True, text=True, timeout=600, cwd=CHECKOUT, check=True)
    return proc.stdout


def test_expire_across_stanzas_sharing_blocks_then_every_backup_restores(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer], pg_wrap_factory: Callable[..., PgServer],
) -> None:
    primary = make_vault(stanza="primary")
    clone = make_vault(stanza="clone")
    source = archived_cluster(pg_server_factory, one_pg_major, primary)
    # The clone is the same system (restored from the primary's backup): same system id.
    clone.run(f"--pg-conninfo={source.conninfo()}", "stanza-create")
    source.pgbench("-i", "-s", "2", "-q")
    expected: dict[str, tuple[Vault, str]] = {}
    first = backup(primary, source)
    expected[first] = (primary, state(source))
    source.switch_wal_and_wait_archived()

    primary.run("restore", f"--pg-data={tmp_path / 'clone'}", f"--set={first}", "--type=immediate",
                "--target-action=promote")
    twin = pg_wrap_factory(tmp_path / "clone", conf={"archive_mode": "on",
                                                     "archive_command": f"{clone.command_line()} wal-push %p"})
    twin.wait_for_recovery_end()
    clone_first = backup(clone, twin)
    expected[clone_first] = (clone, state(twin))
    twin.pgbench("-t", "200", "-n")
    clone_second = backup(clone, twin)
    expected[clone_second] = (clone, state(twin))

    for _ in range(2):
        source.pgbench("-t", "300", "-n")
        source.psql("update pgbench_accounts set abalance = abalance - 1 where aid % 97 = 0")
        latest = backup(primary, source)
        expected[latest] = (primary, state(source))
    clone.run("pin", f"--set={clone_first}", "--annotation=reason=audit")

    dry = json.loads(primary.run("expire", "--keep-last=1", "--dry-run", "--output=json").stdout)
    assert dry["dry_run"] and len(dry["expired"]) == 2 and dry["gc"]["bytes_freed"] > 0
    result = json.loads(primary.run("expire", "--keep-last=1", "--output=json").stdout)
    assert result["expired"] == dry["expired"] and result["kept"] == {latest: ["newest", "last 1"]}
    assert result["gc"]["bytes_freed"] > 0 and result["wal_deleted"] > 0
    text = clone.run("expire", "--keep-last=1").stdout
    assert f"keep    {clone_first}  (pinned)" in text and f"keep    {clone_second}  (newest, last 1)" in text
    assert "expire  " not in text

    remaining = {latest, clone_first, clone_second}
    info = json.loads(repo_wide(primary, "info", "--output=json"))
    assert {s["stanza"] for s in info} == {"primary", "clone"}
    assert {b["id"] for s in info for b in s["backups"]} == remaining
    assert [b["pinned"] for s in info if s["stanza"] == "clone" for b in s["backups"]] == [True, False]
    report = json.loads(repo_wide(primary, "verify", "--output=json"))
    assert report["ok"] and {b["id"] for b in report["backups"]} == remaining, report
    source.stop()
    twin.stop()
    for backup_id in sorted(remaining):
        vault, digest = expected[backup_id]
        assert restored_state(vault, backup_id, tmp_path / f"r-{backup_id}", pg_wrap_factory) == digest, backup_id


def test_gc_waits_for_a_running_backup_and_a_second_backup_is_refused(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer], pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    slow = tmp_path / "slow-archiving"
    # While the flag file exists, archiving takes 8 s a segment, so the backup holds its lock
    # (waiting for its stop segment) long enough to race against it.
    command = f"(test ! -f {slow} || sleep 8) && {vault.command_line()} wal-push %p"
    server = pg_server_factory(one_pg_major, archive_command=command)
    vault.run(f"--pg-conninfo={server.conninfo()}", "stanza-create")
    server.pgbench("-i", "-s", "2", "-q")
    doomed = backup(vault, server)
    # Its manifest gone, the blocks are garbage that the next backup still dedups against:
    # exactly what GC must not delete under a running backup.
    (vault.repo / "stanzas" / "main" / "backups" / f"{doomed}.manifest").unlink()
    server.psql("update pgbench_accounts set abalance = 7 where aid % 1000 = 0")
    server.switch_wal_and_wait_archived()
    digest = state(server)
    slow.touch()
    running = popen(vault, f"--pg-conninfo={server.conninfo()}", "backup")
    deadline = time.monotonic() + 60
    while not [p for p in (vault.repo / "locks").glob("*") if not p.name.startswith(".tmp")]:
        assert time.monotonic() < deadline and running.poll() is None, running.communicate()
        time.sleep(0.02)

    second = vault.run(f"--pg-conninfo={server.conninfo()}", "backup", check=False)
    assert second.returncode == 11 and "backup of stanza main" in second.stderr, second.stderr
    refused = vault.run("gc", check=False)
    assert refused.returncode == 11 and "is running" in refused.stderr and len(refused.stderr.splitlines()) == 1
    waiting = popen(vault, "gc", "--lock-timeout=300", "--output=json")
    time.sleep(1)
    assert waiting.poll() is None
    slow.unlink()
    out, err = running.communicate(timeout=300)
    assert running.returncode == 0, err
    kept = out.strip()
    gc_out, gc_err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, gc_err
    assert json.loads(gc_out)["packs_total"] > 0

    assert vault.run("verify").returncode == 0
    server.stop()
    assert restored_state(vault, kept, tmp_path / "restored", pg_wrap_factory) == digest


def test_gc_killed_at_any_point_leaves_a_valid_repository(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer], pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    server = pg_server_factory(one_pg_major, archive_command=f"{vault.command_line()} wal-push %p")
    vault.run(f"--pg-conninfo={server.conninfo()}", "stanza-create", "--pack-size=1")
    server.pgbench("-i", "-s", "3", "-q")
    ids = []
    for round_ in range(4):
        server.psql(f"update pgbench_accounts set abalance = {round_} where aid % 13 = {round_}")
        ids.append(backup(vault, server))
    server.switch_wal_and_wait_archived()
    digest = state(server)
    server.stop()
    for backup_id in ids[:-1]:  # as expire would, without its GC
        (vault.repo / "stanzas" / "main" / "backups" / f"{backup_id}.manifest").unlink()
    pristine = tmp_path / "pristine"
    shutil.copytree(vault.repo, pristine)

    def names(repo: Path) -> set[str]:
        return {p.name for sub in ("packs", "index") for p in (repo / sub).rglob("*") if not p.name.startswith(".tmp")}

    # Kill after the k-th change GC makes to the repository, as seen by polling it.
    killed = []
    for kill_after in (1, 2, 3, 5, 8, 13):
        victim = tmp_path / f"victim-{kill_after}"
        shutil.copytree(pristine, victim)
        before = names(victim)
        target = Vault(victim, vault.stanza)
        proc = popen(target, "gc")
        seen, changes = before, 0
        while proc.poll() is None and changes < kill_after:
            now = names(victim)
            if now != seen:
                changes += 1
                seen = now
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            killed.append((kill_after, len(names(victim) ^ before)))
        report = target.run("verify", "--output=json", check=False)
        assert report.returncode == 0, (kill_after, report.stdout, report.stderr)
        assert json.loads(target.run("gc", "--output=json").stdout)["packs_total"] > 0
        assert target.run("verify").returncode == 0
        if proc.returncode != -signal.SIGKILL:
            break  # GC finished before the k-th change: larger k would not kill it either
    # Killed mid-way at least twice, with part of the work done each time.
    assert len([k for k, changed in killed if changed]) >= 2, killed
    assert restored_state(Vault(victim, vault.stanza), ids[-1], tmp_path / "restored", pg_wrap_factory) == digest
