"""Choose the default block size by measurement (docs/FORMAT.md §4).

One pgbench cluster, one repository per candidate block size, all archiving the same WAL.
Each repository takes a full backup; then a seeded churn touches ~2% of pgbench_accounts pages
(scattered, the worst case for large blocks); then each takes an incremental. Reported per
block size: full and incremental bytes stored (WAL excluded), index bytes, manifest bytes,
and backup wall times. Run as an unprivileged user:

    python benchmarks/block_size.py --pg 15 --scale 100 --sizes 8,16,32,64,128
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import churn  # noqa: E402
from tests.support.pgserver import PgServer  # noqa: E402


def sizes(repo: Path) -> dict[str, int]:
    out = {"data": 0, "index": 0, "manifest": 0, "wal": 0}
    for dirpath, _dirs, files in os.walk(repo):
        for name in files:
            size = os.path.getsize(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), repo)
            if "/wal/" in rel:
                out["wal"] += size
            elif rel.startswith("index/"):
                out["index"] += size
            elif rel.endswith(".manifest"):
                out["manifest"] += size
            elif rel.startswith("packs/"):
                out["data"] += size
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", type=int, default=15)
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--sizes", default="8,16,32,64,128")
    parser.add_argument("--churn", type=float, default=0.02)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pgvault-bs-", dir="/var/tmp"))
    kib = [int(s) for s in args.sizes.split(",")]
    vault = [sys.executable, "-m", "pgvault", "--stanza=bs"]
    repos = {k: work / f"repo-{k}" for k in kib}
    push = work / "push.sh"
    push.write_text("#!/bin/sh\nset -e\n" + "".join(f"{' '.join(vault)} --repo={repos[k]} wal-push \"$1\"\n" for k in kib))
    push.chmod(0o755)
    server = PgServer(args.pg, work / "cluster")
    server.init(archive_command=f"{push} %p", extra_conf={"max_wal_size": "4GB"})
    server.start()
    try:
        for k in kib:  # every repository must exist before the first WAL segment is pushed
            subprocess.run([*vault, f"--repo={repos[k]}", f"--pg-conninfo={server.conninfo()}", f"--block-size={k}",
                            "stanza-create"], check=True, capture_output=True)
        server.pgbench("-i", "-s", str(args.scale), "-q")
        server.psql("checkpoint;")
        rows: dict[int, dict[str, float]] = {}
        for k in kib:
            base = [*vault, f"--repo={repos[k]}", f"--pg-conninfo={server.conninfo()}"]
            t = time.time()
            subprocess.run([*base, "backup", "--type=full"], check=True, capture_output=True)
            rows[k] = {"full_wall": time.time() - t, **{f"full_{n}": v for n, v in sizes(repos[k]).items()}}
        churn(server, args.scale, args.churn, seed=1)
        server.psql("checkpoint;")
        for k in kib:
            base = [*vault, f"--repo={repos[k]}", f"--pg-conninfo={server.conninfo()}"]
            t = time.time()
            subprocess.run([*base, "backup", "--type=incr"], check=True, capture_output=True)
            after = sizes(repos[k])
            rows[k]["incr_wall"] = time.time() - t
            for n in ("data", "index", "manifest"):
                rows[k][f"incr_{n}"] = after[n] - rows[k][f"full_{n}"]
    finally:
        server.cleanup()
    mib = 1 << 20
    print(f"pg {args.pg}, scale {args.scale}, churn {args.churn} of pgbench_accounts pages, {time.strftime('%Y-%m-%d')}")
    print("| block | full data MiB | full index MiB | full manifest KiB | full s | incr data MiB | incr index KiB | incr manifest KiB | incr s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} KiB | {r['full_data'] / mib:.1f} | {r['full_index'] / mib:.2f} | {r['full_manifest'] / 1024:.0f} | {r['full_wall']:.1f} "
              f"| {r['incr_data'] / mib:.2f} | {r['incr_index'] / 1024:.0f} | {r['incr_manifest'] / 1024:.0f} | {r['incr_wall']:.1f} |")


if __name__ == "__main__":
    main()
