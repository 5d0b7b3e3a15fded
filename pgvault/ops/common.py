"""Opening the repository and checking that a cluster belongs to a stanza."""

from __future__ import annotations

from pgvault.backends.base import Backend, BackendSettings
from pgvault.backends.registry import open_backend
from pgvault.config import Options
from pgvault.errors import ClusterMismatchError
from pgvault.repository.repository import Repository, StanzaInfo


def open_repository_backend(opts: Options) -> Backend:
    settings = BackendSettings(
        endpoint=opts.repo_endpoint,
        region=opts.repo_region,
        s3_path_style=opts.repo_s3_path_style,
        storage_class=opts.repo_storage_class,
        s3_sse_kms_key_id=opts.repo_s3_sse_kms_key_id,
        retry_timeout=opts.repo_retry_timeout,
        azure_env=opts.azure_env,
    )
    return open_backend(opts.require_repo(), settings)


def open_repository(opts: Options) -> Repository:
    return Repository.open(open_repository_backend(opts), opts.passphrase)


def check_cluster(info: StanzaInfo, system_id: str, pg_version: int) -> None:
    """Refuse to mix clusters in one stanza: their WAL and blocks would be nonsense together."""
    if info.system_id != system_id:
        raise ClusterMismatchError(
            f"stanza {info.stanza} belongs to system {info.system_id}, but the server is system {system_id}: "
            "use another stanza for this cluster"
        )
    if info.pg_version // 10000 != pg_version // 10000:
        raise ClusterMismatchError(
            f"stanza {info.stanza} was created for PostgreSQL {info.pg_version // 10000}, "
            f"the server runs {pg_version // 10000}: create a new stanza after a major upgrade"
        )
