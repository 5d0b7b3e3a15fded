"""Timelines: promote a restored cluster, archive and back up on timeline 2, and recover
across the switch (to 'latest', to a numbered timeline, and staying on the current one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def rows(server: PgServer) -> str:
    return server.psql("select string_agg(tag, ',' order by tag) from marks")


def test_recovery_follows_timelines(
    pg_major: int,
    tmp_path: Path,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    vault = make_vault()
    source = archived_cluster(pg_server_factory, pg_major, vault)
    source.psql("create table marks (tag text)")
    first = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()
    source.psql("insert into marks values ('a')")
    branch_point = source.psql("select pg_current_wal_insert_lsn()")
    source.psql("insert into marks values ('b1')")
    source.switch_wal_and_wait_archived()

    def restore(name: str, *args: str, archive: bool = False) -> PgServer:
        target = tmp_path / name
        vault.run("restore", f"--pg-data={target}", *args)
        server = pg_wrap_factory(target, conf={} if archive else {"archive_mode": "off"})
        server.wait_for_recovery_end()
        return server

    # Branch: recover to before 'b1' and promote; the new timeline archives into the same stanza.
    branch = restore("branch", "--type=lsn", f"--target={branch_point}", "--target-action=promote", archive=True)
    assert branch.psql("select timeline_id from pg_control_checkpoint()") in ("1", "2")
    branch.psql("checkpoint")
    assert branch.psql("select timeline_id from pg_control_checkpoint()") == "2"
    branch.psql("insert into marks values ('b2')")
    branch.switch_wal_and_wait_archived()
    names = {p.name for p in (vault.repo / "stanzas" / "main" / "wal").rglob("*") if p.is_file()}
    assert "00000002.history" in names

    # A backup taken on timeline 2 restores on its own.
    second = vault.run(f"--pg-conninfo={branch.conninfo()}", "backup").stdout.strip()
    info = json.loads(vault.run("info", "--output=json").stdout)[0]["backups"]
    assert [b["timeline"] for b in info] == [1, 2]
    branch.psql("insert into marks values ('c2')")
    branch.switch_wal_and_wait_archived()
    on_two = restore("from_second", f"--set={second}")
    assert rows(on_two) == "a,b2,c2"
    on_two.stop()

    # From the timeline-1 backup: 'latest' (the default) follows the switch to timeline 2.
    latest = restore("latest", f"--set={first}")
    assert rows(latest) == "a,b2,c2"
    latest.stop()
    # ... a numbered timeline, or 'current', stays where asked.
    one = restore("one", f"--set={first}", "--target-timeline=1")
    assert rows(one) == "a,b1"
    one.stop()
    current = restore("current", f"--set={first}", "--target-timeline=current")
    assert rows(current) == "a,b1"
    current.stop()
    # Without --set, timeline 2 picks the backup taken on it; timeline 1 the first one.
    chosen = json.loads(vault.run("restore", f"--pg-data={tmp_path / 'auto'}", "--target-timeline=2", "--output=json").stdout)
    assert chosen["backup"] == second
    chosen = json.loads(vault.run("restore", f"--pg-data={tmp_path / 'auto1'}", "--target-timeline=1", "--output=json").stdout)
    assert chosen["backup"] == first
