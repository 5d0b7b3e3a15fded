"""The registry: URL parsing, lazy SDK imports, and the options that reach the backends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgvault.backends.base import BackendSettings
from pgvault.backends.readahead import ReadAheadBackend
from pgvault.backends.registry import open_backend, split_bucket_url
from pgvault.backends.retry import RetryingBackend
from pgvault.config import repo_option_args, resolve
from pgvault.errors import ConfigError

CHECKOUT = Path(__file__).resolve().parents[2]
SDKS = ("boto3", "botocore", "s3transfer", "google", "azure")


def test_wal_push_to_a_filesystem_repository_imports_no_cloud_sdk(tmp_path: Path) -> None:
    """archive_command runs once per segment: it must not pay for boto3 & co."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from pgvault.backends.fs import FsBackend
        from pgvault.repository.repository import Repository, RepoSettings, StanzaInfo
        repo = Repository.create(FsBackend({str(tmp_path / 'repo')!r}), None, RepoSettings(32768, 1 << 20))
        repo.create_stanza(StanzaInfo("main", "7", 150000, 16 << 20, "now"))
        wal = {str(tmp_path / '000000010000000000000001')!r}
        open(wal, "wb").write(bytes(16 << 20))
        for name in list(sys.modules):
            if name.split(".")[0] in {SDKS!r}:
                raise SystemExit("imported before the test: " + name)
        from pgvault.cli import main
        rc = main(["--stanza=main", "--repo={tmp_path / 'repo'}", "wal-push", wal])
        print(json.dumps([rc, sorted(m for m in sys.modules if m.split(".")[0] in {SDKS!r})]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=CHECKOUT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rc, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 0, proc.stderr
    assert imported == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("gs://bucket/a/b/", ("bucket", "a/b/")),
        ("azure://container/pg/main", ("container", "pg/main/")),
    ],
)
def test_bucket_urls(url: str, expected: tuple[str, str]) -> None:
    assert split_bucket_url(url) == expected


@pytest.mark.parametrize("url", ["s3:///prefix", "s3://key:secret@bucket/p", "gs://bucket/a/../b", "s3://b/p?x=1"])
def test_bad_bucket_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        open_backend(url)


def test_cloud_backends_come_wrapped_in_retry() -> None:
    backend = open_backend("s3://bucket/prefix", BackendSettings(endpoint="http://127.0.0.1:9", retry_timeout=7))
    assert isinstance(backend, ReadAheadBackend)
    assert isinstance(backend.inner, RetryingBackend) and backend.inner.timeout == 7
    assert backend.describe() == "s3://bucket/prefix/ at http://127.0.0.1:9"


def test_repo_options_travel_into_restore_command_without_secrets() -> None:
    env = {"PGVAULT_REPO_REGION": "eu-west-1", "AZURE_STORAGE_KEY": "sekrit", "AZURE_STORAGE_ACCOUNT": "acct"}
    cli = {"repo": "s3://b/p", "repo-endpoint": "http://minio:9000", "repo-s3-path-style": True}
    opts = resolve("restore", (), cli, env)
    assert repo_option_args(opts) == ["--repo-endpoint=http://minio:9000", "--repo-region=eu-west-1", "--repo-s3-path-style"]
    assert opts.azure_env == {"AZURE_STORAGE_KEY": "sekrit", "AZURE_STORAGE_ACCOUNT": "acct"}
    assert "sekrit" not in repr(opts)
