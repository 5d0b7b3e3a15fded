"""check: is this stanza ready to back up and to archive WAL? One line per check.

The checks run in dependency order; one that cannot run because an earlier one failed is
reported as skipped. The archive check is end to end, as a DBA would test it by hand: write a
WAL record, switch segments, and wait until that very segment is in the repository.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import psycopg

from pgvault.backends.base import Backend, ObjectNotFound
from pgvault.config import Options
from pgvault.errors import ConfigError, PgvaultError, PostgresError, RepositoryError, WalError
from pgvault.ops.common import check_cluster, open_repository_backend
from pgvault.pg.replication import ReplicationConnection, SystemIdentity
from pgvault.repository import layout
from pgvault.repository.repository import Repository, StanzaInfo


@dataclass(frozen=True)
class CheckLine:
    name: str
    status: str  # ok, fail, skip
    detail: str
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail}


class Checker:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.lines: list[CheckLine] = []

    def step(self, name: str, fn: Callable[[], str], needs: bool = True) -> bool:
        """Run one check (unless a prerequisite failed); True if it passed."""
        if not needs:
            self.lines.append(CheckLine(name, "skip", "an earlier check failed"))
            return False
        try:
            detail = fn()
        except PgvaultError as exc:
            self.lines.append(CheckLine(name, "fail", exc.message, exc.exit_code))
            return False
        self.lines.append(CheckLine(name, "ok", detail))
        return True

    @property
    def exit_code(self) -> int:
        return next((line.exit_code for line in self.lines if line.status == "fail"), 0)


def check(opts: Options) -> Checker:
    c = Checker(opts)
    state: dict[str, Any] = {}

    def config() -> str:
        state["stanza"] = opts.require_stanza()
        state["repo_url"] = opts.require_repo()
        source = opts.config if os.path.exists(opts.config) else "no config file"
        return f"stanza {state['stanza']}, repository {state['repo_url']} ({source})"

    def reachable() -> str:
        backend = open_repository_backend(opts)
        try:
            backend.get(layout.CONFIG)
        except ObjectNotFound:
            raise RepositoryError(f"no pgvault repository at {backend.describe()}: run 'pgvault stanza-create'") from None
        state["backend"] = backend
        return f"{backend.describe()} answers"

    def passphrase() -> str:
        repo = Repository.open(state["backend"], opts.passphrase)
        state["repo"] = repo
        return "the passphrase opens the repository keys" if repo.keys.encrypted else "unencrypted repository"

    def writable() -> str:
        backend: Backend = state["backend"]
        key = f"check/{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        payload = os.urandom(32)
        try:
            if not backend.put_if_absent(key, payload) or backend.get(key) != payload:
                raise RepositoryError(f"a test object written to {backend.describe()} did not read back")
        finally:
            backend.delete(key)
        return "a test object was written, read back and deleted"

    def stanza() -> str:
        info: StanzaInfo = state["repo"].stanza_info(state["stanza"])
        state["info"] = info
        return f"system {info.system_id}, PostgreSQL {info.pg_version // 10000}, created {info.created}"

    def server() -> str:
        conn = ReplicationConnection(opts.pg_conninfo, application_name="pgvault check")
        state["conn"] = conn
        ident: SystemIdentity = conn.identify_system()
        state["ident"] = ident
        return f"PostgreSQL {conn.server_version}, system {ident.system_id}, timeline {ident.timeline}, replication allowed"

    def matches() -> str:
        conn: ReplicationConnection = state["conn"]
        check_cluster(state["info"], state["ident"].system_id, conn.server_version)
        return "system identifier and major version match the stanza"

    def archive_settings() -> str:
        conn: ReplicationConnection = state["conn"]
        mode = conn.show("archive_mode")
        if mode not in ("on", "always"):
            raise ConfigError(f"archive_mode is {mode}: set archive_mode = on and restart PostgreSQL")
        if conn.server_version >= 150000 and conn.show("archive_library"):
            raise ConfigError(f"archive_library is {conn.show('archive_library')!r}: pgvault archives through archive_command")
        command = conn.show("archive_command")
        if "pgvault" not in command or "wal-push" not in command:
            raise ConfigError(f"archive_command {command!r} does not run 'pgvault wal-push %p'")
        other = _stanza_in(command)
        if other is not None and other != state["stanza"]:
            raise ConfigError(f"archive_command pushes to stanza {other}, not {state['stanza']}")
        return f"archive_mode = {mode}, archive_command runs pgvault wal-push"

    def archiving() -> str:
        segment, waited = _switch_and_wait(opts, state["repo"], state["stanza"])
        return f"WAL segment {segment} reached the repository in {waited:.1f}s"

    ok = c.step("config", config)
    ok_repo = c.step("repository reachable", reachable, ok)
    ok_keys = c.step("passphrase", passphrase, ok_repo)
    c.step("repository writable", writable, ok_repo)
    ok_stanza = c.step("stanza", stanza, ok_keys)
    try:
        ok_server = c.step("server with REPLICATION", server, ok)
        c.step("cluster matches stanza", matches, ok_server and ok_stanza)
        ok_settings = c.step("archive settings", archive_settings, ok_server)
        c.step("archiving end to end", archiving, ok_settings and ok_stanza)
    finally:
        if "conn" in state:
            state["conn"].close()
    return c


def _stanza_in(command: str) -> str | None:
    """The --stanza an archive_command names, if it names one."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word.startswith("--stanza="):
            return word.split("=", 1)[1]
        if word == "--stanza" and i + 1 < len(words):
            return words[i + 1]
    return None


def _switch_and_wait(opts: Options, repo: Repository, stanza: str) -> tuple[str, float]:
    """Write a WAL record, switch segments, and wait for that segment in the repository."""
    try:
        conn = psycopg.connect(opts.pg_conninfo, autocommit=True, application_name="pgvault check")
    except psycopg.Error as exc:
        raise PostgresError(f"cannot connect to run pg_switch_wal(): {str(exc).strip().splitlines()[0]}") from None
    try:
        with conn:
            if conn.execute("select pg_is_in_recovery()").fetchone() == (True,):
                raise PostgresError("the server is a standby: run check against the primary to test archiving")
            # A transaction with an xid writes a commit record, so the switch below is never a
            # no-op (pg_switch_wal() right after another switch returns without one).
            conn.execute("select txid_current()")
            row = conn.execute("select pg_walfile_name(pg_switch_wal())").fetchone()
            assert row is not None
            segment = str(row[0])
            started = time.monotonic()
            while not repo.has_wal(stanza, segment):
                if time.monotonic() - started > opts.archive_timeout:
                    failed = conn.execute("select last_failed_wal, last_failed_time from pg_stat_archiver").fetchone()
                    hint = f" (pg_stat_archiver: last failed {failed[0]} at {failed[1]})" if failed and failed[0] else ""
                    raise WalError(
                        f"WAL segment {segment} did not reach the repository within {opts.archive_timeout}s{hint}: "
                        "see the server log for archive_command errors"
                    )
                time.sleep(0.1)
            return segment, time.monotonic() - started
    except psycopg.Error as exc:
        raise PostgresError(f"cannot switch WAL: {str(exc).strip().splitlines()[0]}") from None


def render_text(c: Checker) -> str:
    width = max(len(line.name) for line in c.lines)
    return "\n".join(f"{line.status:<4}  {line.name:<{width}}  {line.detail}" for line in c.lines)
