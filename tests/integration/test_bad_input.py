"""Bad input: a clear one-line error, a distinct exit code, and nothing written or lost."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its content: proof that nothing changed."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_one_line_error(proc: object, code: int, *needles: str) -> None:
    returncode, stderr = proc.returncode, proc.stderr  # type: ignore[attr-defined]
    assert returncode == code, (returncode, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def backed_up(
    one_pg_major: int, make_vault: Callable[..., Vault], pg_server_factory: Callable[..., PgServer]
) -> tuple[Vault, PgServer]:
    vault = make_vault(encrypted=True)
    server = archived_cluster(pg_server_factory, one_pg_major, vault)
    server.pgbench("-i", "-s", "1", "-q")
    vault.run(f"--pg-conninfo={server.conninfo()}", "backup")
    server.switch_wal_and_wait_archived()  # let the archiver settle so the repository is quiet
    return vault, server


def test_wrong_passphrase(backed_up: tuple[Vault, PgServer], tmp_path: Path) -> None:
    vault, server = backed_up
    before = tree_digest(vault.repo)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase")
    bad = Vault(vault.repo, vault.stanza, wrong)
    assert_one_line_error(bad.run(f"--pg-conninfo={server.conninfo()}", "backup", check=False), 6, "wrong passphrase")
    assert_one_line_error(bad.run("restore", f"--pg-data={tmp_path / 'r'}", check=False), 6, "wrong passphrase")
    assert not (tmp_path / "r").exists()
    no_pass = Vault(vault.repo, vault.stanza, None)
    assert_one_line_error(no_pass.run("info", check=False), 6, "encrypted")
    assert tree_digest(vault.repo) == before


def test_unknown_stanza(backed_up: tuple[Vault, PgServer], tmp_path: Path) -> None:
    vault, server = backed_up
    before = tree_digest(vault.repo)
    other = Vault(vault.repo, "nosuch", vault.passphrase_file)
    assert_one_line_error(other.run(f"--pg-conninfo={server.conninfo()}", "backup", check=False), 3, "unknown stanza")
    assert_one_line_error(other.run("restore", f"--pg-data={tmp_path / 'r'}", check=False), 3, "unknown stanza")
    assert tree_digest(vault.repo) == before


def test_unreachable_server(backed_up: tuple[Vault, PgServer]) -> None:
    vault, server = backed_up
    before = tree_digest(vault.repo)
    proc = vault.run("--pg-conninfo=host=127.0.0.1 port=1 user=postgres connect_timeout=3", "backup", check=False)
    assert_one_line_error(proc, 8, "cannot connect")
    assert tree_digest(vault.repo) == before


def test_role_without_replication(backed_up: tuple[Vault, PgServer]) -> None:
    vault, server = backed_up
    server.psql("create role plain login;")
    before = tree_digest(vault.repo)
    proc = vault.run(f"--pg-conninfo={server.conninfo(user='plain')}", "backup", check=False)
    assert_one_line_error(proc, 8, "REPLICATION")
    assert tree_digest(vault.repo) == before


def test_non_empty_restore_target(backed_up: tuple[Vault, PgServer], tmp_path: Path) -> None:
    vault, _server = backed_up
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "precious").write_text("keep me")
    before = tree_digest(target)
    assert_one_line_error(vault.run("restore", f"--pg-data={target}", check=False), 10, "not empty")
    assert tree_digest(target) == before


def test_other_cluster_is_refused(
    backed_up: tuple[Vault, PgServer], one_pg_major: int, pg_server_factory: Callable[..., PgServer]
) -> None:
    vault, _server = backed_up
    other = pg_server_factory(one_pg_major)
    before = tree_digest(vault.repo)
    proc = vault.run(f"--pg-conninfo={other.conninfo()}", "backup", check=False)
    assert_one_line_error(proc, 7, "belongs to system")
    proc = vault.run(f"--pg-conninfo={other.conninfo()}", "stanza-create", check=False)
    assert_one_line_error(proc, 7, "belongs to system")
    segment = sorted((other.data_dir / "pg_wal").glob("0000*"))[0]
    assert_one_line_error(vault.run("wal-push", str(segment), check=False), 7, "system")
    assert tree_digest(vault.repo) == before


def test_corrupted_block_fails_restore_loudly(backed_up: tuple[Vault, PgServer], tmp_path: Path) -> None:
    vault, _server = backed_up
    packs = sorted((vault.repo / "packs").rglob("*"))
    pack = max((p for p in packs if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[len(data) // 3] ^= 0x40
    pack.write_bytes(bytes(data))
    target = tmp_path / "restored"
    proc = vault.run("restore", f"--pg-data={target}", check=False)
    assert_one_line_error(proc, 5, "authentication")
    assert target.is_dir() and not any(target.iterdir()), "a failed restore must leave the target empty"


def test_wal_push_is_idempotent_and_never_overwrites(backed_up: tuple[Vault, PgServer], tmp_path: Path) -> None:
    vault, server = backed_up
    name = server.switch_wal_and_wait_archived()
    segment = tmp_path / name
    vault.run("wal-fetch", name, str(segment))
    assert segment.stat().st_size == 16 * 1024 * 1024
    vault.run("wal-push", str(segment))  # same content again: success
    data = bytearray(segment.read_bytes())
    data[-1] ^= 1
    segment.write_bytes(bytes(data))
    assert_one_line_error(vault.run("wal-push", str(segment), check=False), 9, "different content")
    fetched = tmp_path / "fetched"
    vault.run("wal-fetch", name, str(fetched))
    assert fetched.read_bytes() != bytes(data)
    assert_one_line_error(vault.run("wal-fetch", "0000000100000000000000FF", str(tmp_path / "x"), check=False), 1, "not in the repository")
    assert not (tmp_path / "x").exists()


def test_an_unusable_index_directory_fails_cleanly(
    backed_up: tuple[Vault, PgServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block index moves to a local file (here after 16 records) in TMPDIR: when that
    directory is unusable, backup and restore fail with one line (exit 3) that names it, no
    backup is recorded, the restore target is left empty, and the repository still verifies."""
    vault, server = backed_up
    monkeypatch.setenv("PGVAULT_INDEX_MEMORY_RECORDS", "16")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "no-such-dir"))
    proc = vault.run(f"--pg-conninfo={server.conninfo()}", "backup", "--type=full", check=False)
    assert_one_line_error(proc, 3, "no-such-dir")
    target = tmp_path / "restored"
    assert_one_line_error(vault.run("restore", f"--pg-data={target}", check=False), 3, "set TMPDIR")
    assert target.is_dir() and not any(target.iterdir())
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert len(json.loads(vault.run("info", "--output=json").stdout)[0]["backups"]) == 1
    vault.run("verify")
