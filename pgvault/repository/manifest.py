"""The backup manifest: everything needed to rebuild PGDATA, written last as the commit point.

Stored as versioned JSON inside a sealed envelope (compressed, then encrypted or checksummed).
Files list their content as block ids; long lists go into a content-addressed block of their
own ("blocklist"), so an unchanged file costs a later backup one id, not one per block.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pgvault.errors import IntegrityError

# 2: file entries may carry blocklist_base (a delta block list); readers accept 1 and 2.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Files with more blocks than this store their block list as a separate blocklist block.
INLINE_BLOCKS = 4


@dataclass
class FileEntry:
    path: str  # relative to the data directory, or to the tablespace root when tablespace is set
    type: str  # 'f' file, 'd' directory, 'l' symlink
    mode: int
    size: int = 0
    mtime: int = 0
    uid: int = 0
    gid: int = 0
    tablespace: int | None = None
    link: str | None = None
    block_size: int = 0
    blocks: list[str] | None = None  # hex block ids, when inline
    blocklist: str | None = None  # hex id of the block holding the concatenated ids
    # When set, blocklist holds only the differences from this (plain) block list: see
    # docs/FORMAT.md §8. Scattered churn rewrites a few blocks of a large file; a delta costs
    # 36 bytes per changed block instead of 32 bytes per block of the file.
    blocklist_base: str | None = None
    checksum_failures: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def blocklist_ids(self) -> list[bytes]:
        """The block-list blocks this entry needs (the list, and its base if it is a delta)."""
        return [bytes.fromhex(b) for b in (self.blocklist, self.blocklist_base) if b is not None]


@dataclass
class Tablespace:
    oid: int
    location: str


@dataclass
class Manifest:
    backup_id: str
    stanza: str
    type: str
    start_time: str
    stop_time: str
    start_lsn: str
    stop_lsn: str
    timeline: int
    stop_timeline: int
    start_wal: str
    stop_wal: str
    pg_version: int
    system_id: str
    wal_segment_size: int
    block_size: int
    database_size: int = 0
    repo_bytes_added: int = 0
    blocks_total: int = 0
    blocks_new: int = 0
    tablespaces: list[Tablespace] = field(default_factory=list)
    files: list[FileEntry] = field(default_factory=list)
    server_manifest: FileEntry | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    pgvault_version: str = ""
    # The start checkpoint's next transaction id (pg_control), for choosing a backup for an
    # xid target; None in manifests written before it was recorded.
    next_xid: int | None = None

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["format"] = FORMAT_VERSION
        doc["files"] = [f.to_json() for f in self.files]
        doc["server_manifest"] = self.server_manifest.to_json() if self.server_manifest else None
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except ValueError:
            raise IntegrityError("manifest is not valid JSON") from None
        version = doc.pop("format", None)
        if version not in READABLE_VERSIONS:
            raise IntegrityError(f"manifest format {version} is not supported by this pgvault")
        doc["files"] = [FileEntry(**f) for f in doc["files"]]
        doc["tablespaces"] = [Tablespace(**t) for t in doc["tablespaces"]]
        if doc.get("server_manifest"):
            doc["server_manifest"] = FileEntry(**doc["server_manifest"])
        return cls(**doc)

    def summary(self) -> dict[str, Any]:
        """What info shows: everything but the file list."""
        return {
            "id": self.backup_id,
            "type": self.type,
            "start_time": self.start_time,
            "stop_time": self.stop_time,
            "start_lsn": self.start_lsn,
            "stop_lsn": self.stop_lsn,
            "timeline": self.timeline,
            "start_wal": self.start_wal,
            "stop_wal": self.stop_wal,
            "pg_version": self.pg_version,
            "system_id": self.system_id,
            "database_size": self.database_size,
            "repo_bytes_added": self.repo_bytes_added,
            "blocks_total": self.blocks_total,
            "blocks_new": self.blocks_new,
            "files": len(self.files),
            "tablespaces": [asdict(t) for t in self.tablespaces],
            "checksum_failures": sum(len(f.checksum_failures or ()) for f in self.files),
            "annotations": self.annotations,
            "parent": self.parent,
            "next_xid": self.next_xid,
        }
