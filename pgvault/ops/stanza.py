"""stanza-create: create the repository if needed and record which cluster a stanza is."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pgvault.config import Options
from pgvault.ops.common import check_cluster, open_repository_backend
from pgvault.pg.replication import ReplicationConnection
from pgvault.repository.repository import (
    Repository,
    RepoSettings,
    StanzaInfo,
)


@dataclass(frozen=True)
class StanzaResult:
    info: StanzaInfo
    created: bool


def stanza_create(opts: Options) -> StanzaResult:
    stanza = opts.require_stanza()
    backend = open_repository_backend(opts)
    repo = Repository.create(backend, opts.passphrase, RepoSettings(opts.block_size * 1024, opts.pack_size * 1024 * 1024))
    with ReplicationConnection(opts.pg_conninfo) as conn:
        ident = conn.identify_system()
        info = StanzaInfo(
            stanza=stanza,
            system_id=ident.system_id,
            pg_version=conn.server_version,
            wal_segment_size=conn.wal_segment_size(),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
    if repo.create_stanza(info):
        return StanzaResult(info, True)
    existing = repo.stanza_info(stanza)
    check_cluster(existing, info.system_id, info.pg_version)
    return StanzaResult(existing, False)
