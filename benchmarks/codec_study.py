"""How big would an incremental be with another block size or codec? (docs/FORMAT.md §4)

Works offline on a repository made with 8 KiB blocks (one page per block) that holds a full
backup and an incremental after benchmarks.bench.churn, e.g. from

    python benchmarks/block_size.py --pg 15 --scale 100 --sizes 8   # keeps /var/tmp/pgvault-bs-*/repo-8

The pages whose id changed between the two backups say which blocks of each candidate size an
incremental would store; their contents come from the repository. For each block size it
reports the bytes of those blocks compressed one by one with zstd level 1, with zstd level 1
and a dictionary trained on a sample of the full backup's blocks, and in groups of 16, plus the
per-object overhead (envelope, pack trailer and index entry) and the blocklists of changed files.

    python -m benchmarks.codec_study /var/tmp/pgvault-bs-XXXX/repo-8 [--sizes 8,16,32]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import zstandard

from pgvault.backends.fs import FsBackend
from pgvault.repository.repository import Repository

PAGE = 8192
# Per stored block: 16-byte header + 16-byte checksum (40 with encryption: nonce + tag), and a
# 44-byte entry both in the pack trailer and in the index object (random ids: incompressible).
OVERHEAD = 16 + 16 + 44 + 44
ID = 32


def file_ids(repo: Repository, manifest) -> dict[tuple[int | None, str], list[bytes]]:
    return {(f.tablespace, f.path): repo.file_block_ids(f) for f in manifest.files if f.type == "f"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo", type=Path)
    parser.add_argument("--sizes", default="8,16,32")
    parser.add_argument("--dict-sizes", default="32,112")
    parser.add_argument("--sample-mib", type=int, default=8)
    args = parser.parse_args()
    repo = Repository.open(FsBackend(args.repo), None)
    stanza = repo.stanzas()[0]
    backups = repo.list_backups(stanza)
    full = repo.load_manifest(stanza, next(b for b in backups if b.endswith("F")))
    incr = repo.load_manifest(stanza, next(b for b in backups if b.endswith("I")))
    assert full.block_size == PAGE, "needs a repository with 8 KiB blocks"
    old, new = file_ids(repo, full), file_ids(repo, incr)
    changed: dict[tuple[int | None, str], list[int]] = {}
    for key, ids in new.items():
        before = old.get(key, [])
        pages = [i for i, b in enumerate(ids) if i >= len(before) or before[i] != b]
        if pages:
            changed[key] = pages
    print(f"{len(changed)} files changed, {sum(map(len, changed.values()))} pages changed")
    cache: dict[bytes, bytes] = {}

    def page(block_id: bytes) -> bytes:
        data = cache.get(block_id)
        if data is None:
            data = cache[block_id] = repo.read_block(block_id, rehash=False)
        return data

    rnd = random.Random(1)
    full_keys = [k for k, ids in old.items() if len(ids) > 16]
    for kib in (int(s) for s in args.sizes.split(",")):
        per = kib * 1024 // PAGE
        blocks: list[bytes] = []
        blocklists = 0
        for key, pages in changed.items():
            ids = new[key]
            for g in sorted({p // per for p in pages}):
                blocks.append(b"".join(page(i) for i in ids[g * per : (g + 1) * per]))
            n = -(-len(ids) // per)
            if n > 4:
                blocklists += n * ID + OVERHEAD
        raw = sum(map(len, blocks))
        overhead = len(blocks) * OVERHEAD
        comp = zstandard.ZstdCompressor(level=1)
        t = time.process_time()
        plain = sum(len(comp.compress(b)) for b in blocks)
        t_plain = time.process_time() - t
        grouped = sum(len(comp.compress(b"".join(blocks[i : i + 16]))) for i in range(0, len(blocks), 16))
        # Training sample: random blocks of the full backup, args.sample_mib in all.
        samples = []
        while sum(map(len, samples)) < args.sample_mib << 20:
            ids = old[rnd.choice(full_keys)]
            g = rnd.randrange(0, -(-len(ids) // per))
            samples.append(b"".join(page(i) for i in ids[g * per : (g + 1) * per]))
        print(f"\n{kib} KiB blocks: {len(blocks)} changed, {raw / 2**20:.1f} MiB raw, per-object overhead "
              f"{overhead / 2**20:.2f} MiB, blocklists {blocklists / 2**20:.2f} MiB")
        print(f"  zstd-1 one by one: {plain / 2**20:.2f} MiB ({raw / plain:.1f}x, {raw / t_plain / 1e6:.0f} MB/s)"
              f" -> total {(plain + overhead + blocklists) / 2**20:.2f} MiB")
        print(f"  zstd-1 in groups of 16: {grouped / 2**20:.2f} MiB ({raw / grouped:.1f}x)"
              f" -> total {(grouped + overhead / 16 + blocklists) / 2**20:.2f} MiB")
        for dkib in (int(s) for s in args.dict_sizes.split(",")):
            t = time.time()
            zdict = zstandard.train_dictionary(dkib * 1024, samples, level=1)
            t_train = time.time() - t
            dcomp = zstandard.ZstdCompressor(level=1, dict_data=zdict)
            t = time.process_time()
            withdict = [dcomp.compress(b) for b in blocks]
            t_dict = time.process_time() - t
            dsize = sum(map(len, withdict))
            ddec = zstandard.ZstdDecompressor(dict_data=zdict)
            t = time.process_time()
            for c in withdict:
                ddec.decompress(c)
            t_dec = time.process_time() - t
            print(f"  zstd-1 + {dkib} KiB dictionary (trained in {t_train:.1f} s): {dsize / 2**20:.2f} MiB "
                  f"({raw / dsize:.1f}x, {raw / t_dict / 1e6:.0f} MB/s, decompress {raw / t_dec / 1e6:.0f} MB/s)"
                  f" -> total {(dsize + overhead + blocklists) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
