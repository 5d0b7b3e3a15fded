"""Fixtures for end-to-end tests: a real cluster archiving into a pgvault repository."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import pg_versions
from tests.support.pgserver import PgServer

PASSPHRASE = "integration-test-passphrase"
CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass
class Vault:
    """How tests call pgvault: always the real CLI in a subprocess, as PostgreSQL would."""

    repo: Path | str  # a directory, or a URL such as s3://bucket/prefix
    stanza: str = "main"
    passphrase_file: Path | None = None
    extra_args: tuple[str, ...] = ()  # e.g. --repo-endpoint for an object store

    def base_args(self) -> list[str]:
        args = [f"--stanza={self.stanza}", f"--repo={self.repo}", *self.extra_args]
        if self.passphrase_file:
            args.append(f"--passphrase-file={self.passphrase_file}")
        return args

    def command_line(self) -> str:
        """For archive_command / restore_command.

        PYTHONPATH pins the checkout under test: PostgreSQL runs the command from its data
        directory, where ``-m`` would otherwise find an installed copy (another worktree's).
        ``-S`` as restore writes it: site is loaded only when the async fast path misses.
        """
        return " ".join([f"PYTHONPATH={shlex.quote(str(CHECKOUT))}", sys.executable, "-S", "-m", "pgvault",
                         *self.base_args()])

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "pgvault", *self.base_args(), *args],
            capture_output=True, text=True, timeout=600, cwd=CHECKOUT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"pgvault {' '.join(args)} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
        return proc


@pytest.fixture
def make_vault(tmp_path: Path) -> Callable[..., Vault]:
    def make(
        encrypted: bool = False, stanza: str = "main", repo: Path | str | None = None, extra_args: tuple[str, ...] = ()
    ) -> Vault:
        passfile = None
        if encrypted:
            passfile = tmp_path / f"passphrase-{stanza}"
            passfile.write_text(PASSPHRASE + "\n")
            passfile.chmod(0o600)
        return Vault(repo=repo or tmp_path / "repo", stanza=stanza, passphrase_file=passfile, extra_args=extra_args)

    return make


@pytest.fixture
def one_pg_major(request: pytest.FixtureRequest) -> int:
    """Error-path tests run on one version: 15 when selected, else the first selected."""
    versions = pg_versions(request.config)
    return 15 if 15 in versions else versions[0]


def archived_cluster(make_server: Callable[..., PgServer], major: int, vault: Vault) -> PgServer:
    """A started cluster whose archive_command pushes into the vault, with its stanza created."""
    server = make_server(major, archive_command=f"{vault.command_line()} wal-push %p")
    vault.run(f"--pg-conninfo={server.conninfo()}", "stanza-create")
    return server
