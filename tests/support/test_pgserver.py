"""Smoke tests of the PostgreSQL test harness itself, once per selected major.

Why: every integration test relies on these servers; if a version's binaries,
replication access, contrib (amcheck) or checksums don't work, we want one
obvious failure here rather than confusing ones elsewhere.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

import psycopg
import pytest

from tests.support.pgserver import PgServer, PgServerFactory

pytestmark = pytest.mark.integration


def _controldata(server: PgServer, key: str) -> str:
    out = server.run_bin("pg_controldata").stdout
    for line in out.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    raise AssertionError(f"{key!r} not in pg_controldata output:\n{out}")


def test_server_basics(pg_major: int, pg_server_factory: PgServerFactory) -> None:
    server = pg_server_factory(pg_major)
    assert server.is_running
    assert server.psql("select version()").startswith(f"PostgreSQL {pg_major}.")
    assert server.version_num // 10000 == pg_major
    assert server.psql("show data_checksums") == "on"
    assert server.psql("show wal_level") == "replica"
    assert server.psql("select 1; select 2") == "1\n2"

    with psycopg.connect(server.conninfo(), replication="true", autocommit=True) as conn:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
    assert row is not None
    # Replication connections can't look up type OIDs, so psycopg returns bytes.
    systemid, timeline = (v.decode() if isinstance(v, bytes) else str(v) for v in row[:2])
    assert timeline == "1"

    server.pgbench("-i", "-s", "1", "-q")
    assert server.psql("select count(*) from pgbench_accounts") == "100000"
    server.pgbench(["-c", "2", "-t", "50", "-n"])
    server.run_bin("pg_amcheck", "--all", "--install-missing")

    server.stop()
    assert not server.is_running
    assert _controldata(server, "Database system identifier") == systemid
    out = server.run_bin("pg_checksums", "--check").stdout
    assert re.search(r"^Bad checksums:\s+0$", out, re.M), out


def test_wrap_existing_data_dir(
    pg_major: int, pg_server_factory: PgServerFactory, pg_wrap_factory: PgServerFactory
) -> None:
    src = pg_server_factory(pg_major)
    src.psql("create table t as select generate_series(1, 1000) as i")
    src.stop()
    conf_files = ["postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pgvault_test.conf"]
    before = {n: hashlib.sha256((src.data_dir / n).read_bytes()).hexdigest() for n in conf_files}

    wrapped = pg_wrap_factory(src.data_dir, conf={"archive_mode": "off"})
    assert wrapped.major == pg_major
    assert wrapped.port != src.port and wrapped.socket_dir != src.socket_dir
    assert wrapped.psql("show port") == str(wrapped.port)
    assert wrapped.psql("show archive_mode") == "off"
    assert wrapped.psql("select sum(i) from t") == "500500"
    wrapped.restart()
    assert wrapped.psql("select count(*) from t") == "1000"
    wrapped.stop()
    after = {n: hashlib.sha256((src.data_dir / n).read_bytes()).hexdigest() for n in conf_files}
    assert after == before


def test_archiving_and_reload(pg_major: int, pg_server_factory: PgServerFactory, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    cmd = f"cp %p {shlex.quote(str(archive))}/%f"
    server = pg_server_factory(pg_major, archive_command=cmd)
    assert server.psql("show archive_mode") == "on"
    server.psql("create table t as select generate_series(1, 10000) as i")
    walfile = server.switch_wal_and_wait_archived()
    assert (archive / walfile).is_file()

    server.set_conf(archive_command="/bin/false")
    server.reload()
    assert server.psql("show archive_command") == "/bin/false"
