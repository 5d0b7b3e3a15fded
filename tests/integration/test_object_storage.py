"""End to end on object storage: S3 (moto), GCS (fake-gcs-server), Azure (Azurite).

A real cluster archives WAL through archive_command into the bucket, a backup goes there,
and a point-in-time restore comes back from it: restore_command (written by pgvault
restore) fetches the WAL from the bucket while PostgreSQL replays up to a timestamp. Then
check, a second backup, expire (with its garbage collection) and verify run on the same bucket.
Credentials and endpoints reach every pgvault process the way a user would give them: the
SDKs' standard environment (inherited by PostgreSQL, hence by archive/restore_command),
and for S3 the explicit --repo-endpoint/--repo-region/--repo-s3-path-style options, which
restore must carry into restore_command itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.integration.conftest import Vault, archived_cluster
from tests.support.emulators import Cloud, apply_env
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.pgserver import PgServer

pytestmark = pytest.mark.integration


def digest(server: PgServer, table: str) -> str:
    return server.psql(f"select count(*) || ':' || coalesce(md5(string_agg(t::text, ',' order by t::text)), '') from {table} t")


def cloud_vault(
    cloud: Cloud, make_vault: Callable[..., Vault], monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...] = ()
) -> Vault:
    bucket = cloud.new_bucket()
    if cloud.scheme == "s3":
        # Endpoint, region and addressing as pgvault options instead of AWS_ENDPOINT_URL.
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        monkeypatch.delenv("AWS_DEFAULT_REGION")
        extra += (f"--repo-endpoint={cloud.emulator.url}", "--repo-region=us-east-1", "--repo-s3-path-style")
    return make_vault(encrypted=True, repo=cloud.url(bucket, "backups/pg"), extra_args=extra)


def backup_and_pitr(
    major: int,
    vault: Vault,
    tmp_path: Path,
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    source = archived_cluster(pg_server_factory, major, vault)
    source.pgbench("-i", "-s", "2", "-q")
    source.psql("create table marks (batch text, n int); insert into marks select 'before', g from generate_series(1, 1000) g;")
    backup_id = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()

    # After the backup: batch A, the target time, then batch B that PITR must leave out.
    source.pgbench("-t", "200", "-c", "2", "-n")
    source.psql("insert into marks select 'a', g from generate_series(1, 1000) g;")
    expected = {t: digest(source, t) for t in ("pgbench_accounts", "pgbench_history", "marks")}
    time.sleep(1.1)
    target = source.psql("select clock_timestamp()")
    time.sleep(1.1)
    source.psql("insert into marks select 'b', g from generate_series(1, 1000) g; update pgbench_accounts set abalance = -1;")
    source.switch_wal_and_wait_archived()

    info = json.loads(vault.run("info", "--output=json").stdout)
    assert [b["id"] for b in info[0]["backups"]] == [backup_id]
    wal = info[0]["wal_archive"]
    assert wal["segments"] >= 3 and wal["first"] <= info[0]["backups"][0]["start_wal"]

    # wal-fetch directly: a present segment arrives whole, an absent one is exit 1.
    fetched = tmp_path / "fetched"
    vault.run("wal-fetch", wal["last"], str(fetched))
    assert fetched.stat().st_size == 16 << 20
    missing = vault.run("wal-fetch", "0000000100000099000000FF", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 1, missing.stderr

    restored_dir = tmp_path / "restored"
    vault.run("restore", f"--pg-data={restored_dir}", "--type=time", f"--target={target}", "--target-action=promote")
    auto_conf = (restored_dir / "postgresql.auto.conf").read_text()
    assert vault.base_args()[1] in auto_conf  # restore_command reaches the same repository
    for arg in vault.extra_args:
        assert arg in auto_conf
    restored = pg_wrap_factory(restored_dir, conf={"archive_mode": "off"})
    restored.wait_for_recovery_end()
    assert restored.psql("select batch, count(*) from marks group by batch order by batch") == "a|1000\nbefore|1000"
    for table, value in expected.items():
        assert digest(restored, table) == value, table
    restored.run_bin("pg_amcheck", "--all", "--install-missing", "-h", str(restored.socket_dir),
                     "-p", str(restored.port), "-U", "postgres")

    # The operational commands on the same repository: check, verify, expire with its GC.
    vault.run(f"--pg-conninfo={source.conninfo()}", "check")
    second = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()
    vault.run("expire", "--keep-last=1")
    assert [b["id"] for b in json.loads(vault.run("info", "--output=json").stdout)[0]["backups"]] == [second]
    vault.run("verify")


def test_backup_and_pitr_on_each_cloud(
    cloud: Cloud,
    one_pg_major: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    """--archive-async here (background pusher and prefetcher on the cloud backend); the
    synchronous commands run in the every-major S3 test and the fault test."""
    async_args = ("--archive-async", f"--spool-path={tmp_path / 'spool'}")
    vault = cloud_vault(cloud, make_vault, monkeypatch, async_args)
    backup_and_pitr(one_pg_major, vault, tmp_path, pg_server_factory, pg_wrap_factory)
    assert "--archive-async" in (tmp_path / "restored" / "postgresql.auto.conf").read_text()


def test_backup_and_pitr_on_s3_every_major(
    pg_major: int,
    s3_cloud_session: Cloud,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
    one_pg_major: int,
) -> None:
    if pg_major == one_pg_major:
        pytest.skip(f"PG {pg_major} on S3 is covered by test_backup_and_pitr_on_each_cloud")
    apply_env(monkeypatch, s3_cloud_session)
    vault = cloud_vault(s3_cloud_session, make_vault, monkeypatch)
    backup_and_pitr(pg_major, vault, tmp_path, pg_server_factory, pg_wrap_factory)


def test_missing_bucket_and_bad_credentials_fail_fast(
    cloud: Cloud, make_vault: Callable[..., Vault], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permanent errors are not retried for minutes: one line, config exit code, what to fix."""
    vault = make_vault(repo=cloud.url("pgv-no-such-bucket"))
    started = time.monotonic()
    proc = vault.run("info", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 20
    if cloud.scheme == "azure":
        # Azurite checks shared-key signatures (moto and fake-gcs-server accept anything).
        conn = cloud.env["AZURE_STORAGE_CONNECTION_STRING"]
        wrong = conn.replace("AccountKey=Eby8", "AccountKey=Xby8")
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", wrong)
        proc = make_vault(repo=cloud.url(cloud.new_bucket())).run("info", check=False)
        assert proc.returncode == 3, proc.stderr
        assert "rejected the credentials" in proc.stderr and "Xby8" not in proc.stderr


def test_backup_through_faults_on_s3(
    one_pg_major: int,
    s3_cloud_session: Cloud,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_vault: Callable[..., Vault],
    pg_server_factory: Callable[..., PgServer],
    pg_wrap_factory: Callable[..., PgServer],
) -> None:
    """Every pgvault process talks to S3 through a proxy that throttles and resets.

    Persistent failures of pack uploads make the backup fail cleanly (exit 12, no manifest,
    no index entry without its pack); intermittent ones are retried into a good backup that
    restores, while the same proxy throttles the restore's ranged reads and wal-fetch.
    """
    apply_env(monkeypatch, s3_cloud_session)
    proxy = FaultProxy(upstream_port=s3_cloud_session.emulator.port)
    try:
        bucket = s3_cloud_session.new_bucket()
        vault = make_vault(repo=f"s3://{bucket}/repo", extra_args=(f"--repo-endpoint={proxy.url}", "--repo-s3-path-style", "--repo-retry-timeout=5"))
        source = archived_cluster(pg_server_factory, one_pg_major, vault)
        source.pgbench("-i", "-s", "3", "-q")
        direct = s3_cloud_session.backend(bucket, "repo/")

        proxy.rules = [Rule("drop", match=lambda r: "/packs/" in r.path and r.method == "PUT", times=None)]
        failed = vault.run(f"--pg-conninfo={source.conninfo()}", "backup", check=False)
        assert failed.returncode == 12, failed.stderr
        assert "still failing after" in failed.stderr
        keys = [o.key for o in direct.list("")]
        assert not [k for k in keys if k.endswith(".manifest")]
        packs = {k.rsplit("/", 1)[1] for k in keys if k.startswith("packs/")}
        assert {k.rsplit("/", 1)[1] for k in keys if k.startswith("index/")} <= packs

        proxy.rules = [
            Rule("throttle", times=None, every=4),
            Rule("drop", match=lambda r: "/packs/" in r.path and r.length > (1 << 20), times=2),
        ]
        backup_id = vault.run(f"--pg-conninfo={source.conninfo()}", "backup").stdout.strip()
        assert proxy.rules[0].fired > 3 and proxy.rules[1].fired == 2
        source.psql("create table after_backup as select 1 as one;")
        source.switch_wal_and_wait_archived()
        expected = digest(source, "pgbench_accounts")

        restored_dir = tmp_path / "restored"
        vault.run("restore", f"--pg-data={restored_dir}", f"--set={backup_id}")
        restored = pg_wrap_factory(restored_dir, conf={"archive_mode": "off"})
        restored.wait_for_recovery_end()
        assert digest(restored, "pgbench_accounts") == expected
        assert restored.psql("select one from after_backup") == "1"
    finally:
        proxy.close()
