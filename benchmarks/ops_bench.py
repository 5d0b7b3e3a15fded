"""Operations benchmark: verify against pgBackRest's verify on the same data, and expire + GC of
one backup among ten. Run as an unprivileged user (PostgreSQL refuses root):

    python -m benchmarks.ops_bench --pg 15 --scale 100 --rounds 3 --pgbackrest /opt/pgbackrest-build/src/pgbackrest

Both engines archive the same WAL (one archive_command) and take one full backup of the loaded
cluster; then each expires the WAL from before its backup (pgBackRest verifies its whole archive,
pgvault the WAL from its backups' start on), so both verify one backup and the same WAL. Verify
runs alternate between engines; medians are reported. Then pgvault takes nine more backups with
2% churn before each, and `expire --keep-last 9` removes the oldest: time and bytes freed (with
the default --max-unused 10%, then `gc --max-unused=0` to reclaim every unreferenced byte).

--pgvault-exe times another pgvault's verify (e.g. the ``pgvault`` script of a venv the wheel was
installed into, as users run it) instead of this checkout's ``python -m pgvault``;
--pgvault-also and --pgbackrest-also time more builds' verify in the same rounds, on the same
repositories.
--keep leaves the work directory's repositories behind and --reuse times verify again on them
(no cluster, no backups): for measuring one change after another on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import PgBackRest, PgVault, churn, du, timed  # noqa: E402
from tests.support.pgserver import PgServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", type=int, default=15)
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backups", type=int, default=10)
    parser.add_argument("--pgbackrest", default="/usr/bin/pgbackrest")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--verify-only", action="store_true", help="skip the expire + GC part")
    parser.add_argument("--pgvault-exe", default=None, help="pgvault to time verify with (default: this checkout)")
    parser.add_argument("--pgvault-also", action="append", default=[], metavar="NAME=EXE",
                        help="another pgvault whose verify is timed in the same rounds (e.g. main=/venv/bin/pgvault)")
    parser.add_argument("--pgbackrest-also", action="append", default=[],
                        help="another pgBackRest executable whose verify is timed on the same repository")
    parser.add_argument("--no-block-incremental", action="store_true",
                        help="pgBackRest without repo1-block (2.45's verify reports block-incremental files missing)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory's repositories")
    parser.add_argument("--reuse", action="store_true",
                        help="time verify on the repositories a --keep run left in --work; implies --verify-only")
    args = parser.parse_args()
    if args.reuse and not args.work:
        parser.error("--reuse needs --work")

    work = Path(args.work or tempfile.mkdtemp(prefix="pgvault-opsbench-", dir="/var/tmp"))
    server = PgServer(args.pg, work / "cluster")
    vault = PgVault(work, server, args.jobs)
    pgbr = PgBackRest(work, server, args.jobs, args.pgbackrest, block_incremental=not args.no_block_incremental)
    verifiers = verify_commands(args, vault, pgbr)
    out: dict[str, object] = {}
    samples: dict[str, list[float]] = {}
    if args.reuse:
        time_verify(args, verifiers, samples)
        finish(args, out, samples, float(json.loads((work / "reuse.json").read_text())["db_mib"]), pgbr)
        return
    server.init(archive_command=f"{vault.archive_command()} && {pgbr.archive_command()}",
                extra_conf={"max_wal_size": "1GB", "checkpoint_timeout": "30min"})
    server.start()
    try:
        server.pgbench("-i", "-s", str(args.scale), "-q")
        server.psql("checkpoint;")
        db_mib = int(server.psql("select sum(pg_database_size(oid)) from pg_database")) / 2**20
        vault.setup()
        pgbr.setup()
        server.switch_wal_and_wait_archived(timeout=1800)
        vault.backup("full")
        pgbr.backup("full")
        server.switch_wal_and_wait_archived()
        run([*vault.base, "expire", "--keep-last=1"])
        run([*pgbr.base(), "expire", "--repo1-retention-full=1"])
        out["pgvault_wal_segments"] = len([p for p in (vault.repo / "stanzas" / "bench" / "wal").rglob("*")
                                           if p.is_file() and len(p.name) == 24])
        out["pgbackrest_wal_segments"] = len([p for p in (pgbr.repo / "archive").rglob("*")
                                              if p.is_file() and len(p.name.split("-")[0]) == 24])
        if args.keep:
            (work / "reuse.json").write_text(json.dumps({"db_mib": db_mib}))
        time_verify(args, verifiers, samples)

        if args.verify_only:
            server.cleanup()
            finish(args, out, samples, db_mib, pgbr)
            return
        # expire + GC of one backup among ten
        for i in range(args.backups - 1):
            churn(server, args.scale, 0.02, seed=100 + i)
            server.psql("checkpoint;")
            vault.backup("full")
        server.switch_wal_and_wait_archived()
        before = du(vault.repo, skip="wal")
        keep = f"--keep-last={args.backups - 1}"
        plan = json.loads(subprocess.run([*vault.base, "expire", keep, "--dry-run", "--output=json"],
                                         capture_output=True, text=True, check=True).stdout)
        s = timed([*vault.base, "expire", keep])
        after = du(vault.repo, skip="wal")
        out["expire_one_of_ten"] = {"wall": s.wall, "cpu": s.cpu, "rss_mb": s.rss_mb,
                                    "repo_mib_before": before / 2**20, "repo_mib_after": after / 2**20,
                                    "freed_mib": (before - after) / 2**20, "plan": plan}
        # Then reclaim every unreferenced byte: what --max-unused=0 costs.
        s = timed([*vault.base, "gc", "--max-unused=0"])
        reclaimed = du(vault.repo, skip="wal")
        out["gc_max_unused_0"] = {"wall": s.wall, "cpu": s.cpu, "rss_mb": s.rss_mb,
                                  "freed_mib": (after - reclaimed) / 2**20, "repo_mib_after": reclaimed / 2**20}
        check = subprocess.run([*vault.base, "verify"], capture_output=True, text=True)
        out["verify_after_expire_exit"] = check.returncode
    finally:
        server.cleanup()
    finish(args, out, samples, db_mib, pgbr)


def verify_commands(args: argparse.Namespace, vault: PgVault, pgbr: PgBackRest) -> dict[str, list[str]]:
    """Engine name -> its verify command; pgvault first, then each pgBackRest build."""
    pgvault = [args.pgvault_exe, *vault.base[vault.base.index("-m") + 2:]] if args.pgvault_exe else vault.base
    commands = {"pgvault": [*pgvault, "verify"], "pgbackrest": [*pgbr.base(), "verify"]}
    for spec in args.pgvault_also:
        name, _, exe = spec.partition("=")
        commands[f"pgvault_{name}"] = [exe, *vault.base[vault.base.index("-m") + 2:], "verify"]
    for exe in args.pgbackrest_also:
        version = subprocess.run([exe, "version"], capture_output=True, text=True, check=True).stdout.split()[-1]
        commands[f"pgbackrest_{version}"] = [exe, *pgbr.base()[1:], "verify"]
    return commands


def time_verify(args: argparse.Namespace, verifiers: dict[str, list[str]], samples: dict[str, list[float]]) -> None:
    """Rounds of one verify per engine, the order reversed every other round, then pgvault's
    --sample and --metadata-only."""
    engines = list(verifiers)
    for rnd in range(args.rounds):
        for engine in engines if rnd % 2 == 0 else engines[::-1]:
            s = timed(verifiers[engine])
            samples.setdefault(f"{engine}_verify_wall", []).append(s.wall)
            samples.setdefault(f"{engine}_verify_cpu", []).append(s.cpu)
            samples.setdefault(f"{engine}_verify_rss_mb", []).append(s.rss_mb)
        for mode in ("--sample=5", "--metadata-only"):
            s = timed([*verifiers["pgvault"], mode])
            samples.setdefault(f"pgvault_verify{mode.split('=')[0].replace('--', '_')}_wall", []).append(s.wall)


def finish(args: argparse.Namespace, out: dict[str, object], samples: dict[str, list[float]], db_mib: float,
           pgbr: PgBackRest) -> None:
    medians = {k: statistics.median(v) for k, v in samples.items()}
    out.update({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "pg": args.pg, "scale": args.scale, "db_mib": round(db_mib), "jobs": args.jobs, "rounds": args.rounds,
        "pgbackrest": pgbr.version, "pgvault_exe": args.pgvault_exe or "python -m pgvault (this checkout)",
        "command": " ".join(sys.argv), "medians": medians, "raw": samples,
    })
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")


if __name__ == "__main__":
    main()
