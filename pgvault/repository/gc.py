"""Garbage collection: free the packs no manifest needs, repack the packs few manifests need.

Mark: every block any manifest of any stanza references, including the ids stored inside
block-list blocks and the server's backup_manifest. Sweep, pack by pack:
- a pack with no live block is deleted;
- a pack whose live bytes are under REPACK_BELOW of its size has its live blocks copied into
  new packs (sealed bytes copied as they are, after authenticating them), then it is deleted;
  further packs, most dead first, are repacked while the dead bytes left in kept packs exceed
  max_unused of the repository (restic's --max-unused: space against repacking I/O);
- a pack without an index object (left by a killed backup or GC) is deleted;
- an index object whose pack is gone is deleted, unless a live block is only there (then the
  repository is damaged and GC stops, so that verify can name the backups affected);
- on the filesystem, temp files of packs and index objects whose writer was killed before
  renaming them into place (packs stream into theirs as they fill, so they can be large): any
  age, since no backup can be writing under the exclusive lock; elsewhere (WAL, which wal-push
  writes without a lock) only those older than TEMP_STALE.

Order, so that a kill at any moment leaves a valid repository:
1. write the new packs, each followed by its index object (PackWriter);
2. delete the old packs' index objects;
3. delete the old packs.
After (1) every live block is reachable through a new index object; after (2) old packs are
merely unindexed garbage, which the next GC removes. Nothing a manifest needs is ever
unreachable. GC runs under the exclusive repository lock, so no backup can meanwhile add a
manifest that references a block GC is about to delete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pgvault.backends.base import sweep_temp
from pgvault.errors import IntegrityError
from pgvault.pipeline import envelope
from pgvault.repository import layout
from pgvault.repository.index import Index
from pgvault.repository.locks import RepositoryLock
from pgvault.repository.manifest import FileEntry
from pgvault.repository.packs import PackWriter
from pgvault.repository.repository import Repository

log = logging.getLogger(__name__)

# Repack a pack when less than this share of its bytes is live. Repacking costs a read and a
# write of the live part (on object stores: egress and requests), so only mostly-dead packs pay.
REPACK_BELOW = 0.5
# And beyond that, while unreferenced bytes left in packs exceed this share of the repository.
MAX_UNUSED = 0.10
# Age after which a temp file outside packs/ and index/ is a leftover, not a write in progress.
TEMP_STALE = 3600.0

Entry = tuple[bytes, int, int]


@dataclass
class GcResult:
    blocks_live: int = 0
    packs_total: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_orphaned: int = 0
    packs_written: int = 0
    blocks_copied: int = 0
    bytes_deleted: int = 0
    bytes_written: int = 0
    bytes_unused: int = 0  # dead blocks left in packs that stay (below the repack threshold)
    temp_deleted: int = 0  # leftovers of killed writers (filesystem temp files)
    dry_run: bool = False
    delete: list[str] = field(default_factory=list)
    repack: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return self.bytes_deleted - self.bytes_written

    def as_dict(self) -> dict[str, int | bool]:
        return {
            "blocks_live": self.blocks_live,
            "packs_total": self.packs_total,
            "packs_deleted": self.packs_deleted,
            "packs_repacked": self.packs_repacked,
            "packs_orphaned": self.packs_orphaned,
            "packs_written": self.packs_written,
            "blocks_copied": self.blocks_copied,
            "bytes_freed": self.bytes_freed,
            "bytes_unused": self.bytes_unused,
            "temp_deleted": self.temp_deleted,
            "dry_run": self.dry_run,
        }


def entry_block_ids(repo: Repository, entry: FileEntry) -> list[bytes]:
    """Every block a file entry needs, the block-list block itself included."""
    return repo.file_block_ids(entry) + entry.blocklist_ids()


def mark(repo: Repository, skip: frozenset[tuple[str, str]] = frozenset()) -> set[bytes]:
    """Every block referenced by any manifest in the repository (but those in skip: a dry run
    of expire pretends they are gone)."""
    live: set[bytes] = set()
    for stanza in repo.stanzas():
        for backup_id in repo.list_backups(stanza):
            if (stanza, backup_id) in skip:
                continue
            manifest = repo.load_manifest(stanza, backup_id)
            entries = [*manifest.files, *([manifest.server_manifest] if manifest.server_manifest else [])]
            for entry in entries:
                try:
                    live.update(entry_block_ids(repo, entry))
                except IntegrityError as exc:
                    raise IntegrityError(
                        f"backup {backup_id} of stanza {stanza}: cannot read the block list of {entry.path} ({exc}); "
                        "garbage collection stopped, run 'pgvault verify'"
                    ) from None
    return live


def collect(repo: Repository, lock: RepositoryLock | None, *, dry_run: bool = False,
            repack_below: float = REPACK_BELOW, max_unused: float = MAX_UNUSED,
            skip: frozenset[tuple[str, str]] = frozenset()) -> GcResult:
    """Run one garbage collection. The caller holds the exclusive lock (None only for a dry
    run, or in tests that drive GC directly)."""
    result = GcResult(dry_run=dry_run)
    pack_sizes = {info.key.rsplit("/", 1)[1]: info.size for info in repo.backend.list("packs/")}
    index_sizes = {info.key[len("index/") :]: info.size for info in repo.backend.list("index/")}
    indexed = repo.pack_indexes()
    live = mark(repo, skip)
    result.blocks_live = len(live)
    result.packs_total = len(pack_sizes)

    dangling = [p for p in indexed if p not in pack_sizes]
    present = {p: entries for p, entries in indexed.items() if p in pack_sizes}
    in_present = {e[0] for entries in present.values() for e in entries}
    for pack in dangling:
        lost = [e[0] for e in indexed[pack] if e[0] in live and e[0] not in in_present]
        if lost:
            raise IntegrityError(
                f"pack {pack} is missing but holds {len(lost)} blocks that backups need: "
                "garbage collection stopped, run 'pgvault verify' to see the backups affected"
            )
    orphans = [p for p in pack_sizes if p not in indexed]

    doomed: list[str] = []
    repack: list[str] = []
    dead: dict[str, int] = {}  # dead bytes of the packs that may stay
    for pack, entries in present.items():
        live_bytes = sum(length for block_id, _, length in entries if block_id in live)
        if live_bytes == 0:
            doomed.append(pack)
        elif live_bytes < repack_below * pack_sizes[pack]:
            repack.append(pack)
        else:
            dead[pack] = pack_sizes[pack] - live_bytes
    remaining = sum(pack_sizes[p] for p in dead)
    unused = sum(dead.values())
    for pack in sorted(dead, key=lambda p: dead[p] / pack_sizes[p], reverse=True):
        if unused <= max_unused * remaining or not dead[pack]:
            break
        repack.append(pack)
        unused -= dead[pack]
        remaining -= dead[pack]
    kept = set(present) - set(doomed) - set(repack)
    result.bytes_unused = sum(length for p in kept for block_id, _, length in present[p] if block_id not in live)
    in_kept = {e[0] for p in kept for e in present[p]}
    result.delete, result.repack = sorted(doomed + orphans), sorted(repack)
    result.packs_deleted, result.packs_repacked, result.packs_orphaned = len(doomed), len(repack), len(orphans)
    gone = doomed + repack + orphans
    result.bytes_deleted = sum(pack_sizes[p] for p in gone) + sum(index_sizes.get(p, 0) for p in gone + dangling)
    if dry_run:
        result.bytes_written = sum(
            length for p in repack for block_id, _, length in present[p] if block_id in live and block_id not in in_kept
        )
        return result

    # 0. Leftovers of killed writers: nothing refers to a temp file, so any order is safe.
    if lock is not None:
        lock.ensure_held()
    result.temp_deleted = sum(sweep_temp(repo.backend, prefix, 0.0) for prefix in ("packs/", "index/"))
    result.temp_deleted += sweep_temp(repo.backend, "", TEMP_STALE)

    # 1. Live blocks of the packs to repack into new packs, each followed by its index object.
    writer = PackWriter(repo.backend, repo.keys, Index(), repo.settings.pack_size)
    try:
        for pack in sorted(repack):
            wanted = [e for e in present[pack] if e[0] in live and e[0] not in in_kept and not writer.has(e[0])]
            if not wanted:
                continue
            data = memoryview(repo.backend.get(layout.pack_key(pack)))
            for block_id, offset, length in wanted:
                sealed = bytes(data[offset : offset + length])
                try:
                    envelope.open_(repo.keys, sealed, block_id, envelope.Kind.BLOCK, repo.dictionary)
                except IntegrityError as exc:
                    raise IntegrityError(
                        f"block {block_id.hex()} in pack {pack} is damaged ({exc}): garbage collection stopped "
                        "before deleting anything, run 'pgvault verify'"
                    ) from None
                writer.add(block_id, sealed)
                result.blocks_copied += 1
        writer.flush()
    except BaseException:
        writer.abort()  # the pack being filled is discarded, not left half-written
        raise
    result.packs_written = writer.packs_written
    result.bytes_written = writer.bytes_written

    # 2. Old index objects (and those whose pack is gone): the old packs become unreachable.
    if lock is not None:
        lock.ensure_held()
    for pack in sorted(doomed + repack + dangling):
        repo.backend.delete(layout.index_key(pack))
    # 3. The old packs themselves, and packs that never got an index object.
    if lock is not None:
        lock.ensure_held()
    for pack in sorted(gone):
        repo.backend.delete(layout.pack_key(pack))
    repo.forget_index()
    log.info("gc: %d packs deleted, %d repacked into %d, %d orphans, %d bytes freed",
             len(doomed), len(repack), writer.packs_written, len(orphans), result.bytes_freed)
    return result
