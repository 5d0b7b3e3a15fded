"""A backup killed mid-stream (SIGKILL) leaves no visible backup, and the rerun reuses the packs
it had flushed instead of uploading them again."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest

from pgvault.backends.fs import FsBackend
from pgvault.repository.repository import Repository
from tests.integration.conftest import Vault
from tests.integration.test_expire_gc import popen, restored_state, state
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def indexed_packs(repo: Path) -> int:
    return len([p for p in (repo / "index").glob("*") if not p.name.startswith(".tmp")]) if (repo / "index").exists() else 0


def test_killed_backup_is_invisible_and_the_rerun_skips_stored_blocks(
    one_pg_major: int, tmp_path: Path, make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer], pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    reference = make_vault(repo=tmp_path / "reference")
    both = f"{vault.command_line()} wal-push %p && {reference.command_line()} wal-push %p"
    server = pg_server_factory(one_pg_major, archive_command=both)
    for v in (vault, reference):
        v.run(f"--pg-conninfo={server.conninfo()}", "stanza-create", "--pack-size=1")
    server.pgbench("-i", "-s", "12", "-q")
    server.switch_wal_and_wait_archived()
    digest = state(server)
    # What one uninterrupted backup of this cluster stores, for comparison.
    full = json.loads(reference.run(f"--pg-conninfo={server.conninfo()}", "backup", "--output=json").stdout)
    total_packs = indexed_packs(reference.repo)
    assert total_packs >= 6, total_packs

    proc = popen(vault, f"--pg-conninfo={server.conninfo()}", "backup", "--jobs=1")
    deadline = time.monotonic() + 300
    while indexed_packs(vault.repo) < 0.7 * total_packs:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    # Nothing visible: no manifest, info shows no backup, verify has nothing to complain about.
    assert not list((vault.repo / "stanzas" / "main").glob("backups/*"))
    assert json.loads(vault.run("info", "--output=json").stdout)[0]["backups"] == []
    assert vault.run("verify").returncode == 0
    stored = sum(len(e) for e in Repository.open(FsBackend(vault.repo), None).pack_indexes().values())

    rerun = vault.run(f"--pg-conninfo={server.conninfo()}", "--log-level=warn", "backup", "--output=json")
    assert "removing stale lock" in rerun.stderr  # the killed process's lock, judged by its dead pid
    again = json.loads(rerun.stdout)
    assert again["blocks_total"] == pytest.approx(full["blocks_total"], rel=0.02)
    assert stored >= 0.6 * full["blocks_new"]
    # Blocks the killed run flushed are not stored again (a few changed meanwhile: pg_control,
    # the stats and WAL-related files).
    assert again["blocks_new"] <= full["blocks_new"] - stored + 50
    assert again["repo_bytes_added"] < 0.45 * full["repo_bytes_added"]
    assert vault.run("verify").returncode == 0
    server.stop()
    assert restored_state(vault, again["id"], tmp_path / "restored", pg_wrap_factory) == digest
