"""Side-by-side benchmark: pgvault, pgBackRest and pg_basebackup on one cluster, in one run.

Run as an unprivileged user (PostgreSQL refuses root), e.g. via benchmarks/run.sh:

    python -m benchmarks.bench --pg 15 --scale 100 --jobs 2 --rounds 3 [--incompressible-mib 1024]
    python -m benchmarks.bench --pg 15 --scale 100 --rounds 4 --restore-only   # restore side by side

Engines alternate (A B A B ...) so drift in the machine's load hits both; medians are reported.
Repository sizes exclude the WAL archive (the same WAL goes to both engines).
Every engine is timed with GNU time (wall, user+sys CPU, peak RSS of the process tree's largest
process). Output: a Markdown table on stdout and JSON in --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.pgserver import PgServer  # noqa: E402


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_mb: float


def timed(cmd: list[str], env: dict[str, str] | None = None) -> Sample:
    out = tempfile.NamedTemporaryFile(delete=False)
    out.close()
    proc = subprocess.run(
        ["/usr/bin/time", "-o", out.name, "-f", "%e %U %S %M", *cmd],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    wall, user, system, rss_kb = Path(out.name).read_text().split()[-4:]
    os.unlink(out.name)
    return Sample(float(wall), float(user) + float(system), int(rss_kb) / 1024)


def du(path: Path, skip: str | None = None) -> int:
    """Bytes under path; skip: a directory name whose subtrees are not counted (WAL archives)."""
    total = 0
    for dirpath, dirs, files in os.walk(path):
        if skip in dirs:
            dirs.remove(skip)
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


class PgVault:
    name = "pgvault"

    def __init__(self, work: Path, server: PgServer, jobs: int) -> None:
        self.repo = work / "pgvault-repo"
        self.server = server
        self.jobs = jobs
        self.base = [sys.executable, "-m", "pgvault", "--stanza=bench", f"--repo={self.repo}", f"--jobs={jobs}"]

    def archive_command(self) -> str:
        return " ".join(self.base) + " wal-push %p"

    def setup(self) -> None:
        subprocess.run([*self.base, f"--pg-conninfo={self.server.conninfo()}", "stanza-create"], check=True,
                       capture_output=True)

    def backup(self, kind: str) -> Sample:
        return timed([*self.base, f"--pg-conninfo={self.server.conninfo()}", "backup", f"--type={kind}"])

    def restore(self, target: Path) -> Sample:
        return timed([*self.base, "restore", f"--pg-data={target}"])

    def repo_size(self) -> int:
        """Backup data only: WAL is archived identically by both engines and would only blur."""
        return du(self.repo, skip="wal")


class PgBackRest:
    name = "pgbackrest"

    def __init__(self, work: Path, server: PgServer, jobs: int, exe: str, repo_conf: str | None = None,
                 block_incremental: bool = True) -> None:
        """repo_conf: the repo1-* lines (default: a local repository under work)."""
        self.exe = exe
        self.server = server
        self.repo = work / "pgbackrest-repo"
        self.conf = work / "pgbackrest.conf"
        self.version = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.strip()
        major, minor = (int(x) for x in self.version.split()[-1].split(".")[:2])
        # Block incremental arrived in 2.45 behind beta=y (which needs bundling).
        block = "" if (major, minor) < (2, 45) or not block_incremental else \
            "repo1-block=y\n" + ("beta=y\n" if (major, minor) == (2, 45) else "")
        # As pgBackRest's user guide recommends for speed: zstd, bundling, block incremental,
        # process-max equal to pgvault's --jobs; archive-async off to match pgvault's sync push.
        repo_lines = repo_conf or f"repo1-path={self.repo}\n"
        self.conf.write_text(
            "[global]\n"
            f"{repo_lines}repo1-retention-full=100\nstart-fast=y\n"
            f"compress-type=zst\ncompress-level=3\nprocess-max={jobs}\nrepo1-bundle=y\n{block}"
            f"log-level-console=warn\nlog-level-file=off\nlock-path={work / 'pgbr-lock'}\nspool-path={work / 'pgbr-spool'}\n"
            "[bench]\n"
            f"pg1-path={server.data_dir}\npg1-port={server.port}\npg1-socket-path={server.socket_dir}\npg1-user=postgres\n"
        )

    def base(self) -> list[str]:
        return [self.exe, f"--config={self.conf}", "--stanza=bench"]

    def archive_command(self) -> str:
        return " ".join(self.base()) + " archive-push %p"

    def setup(self) -> None:
        subprocess.run([*self.base(), "stanza-create"], check=True, capture_output=True)

    def backup(self, kind: str) -> Sample:
        return timed([*self.base(), "backup", f"--type={kind}"])

    def restore(self, target: Path) -> Sample:
        return timed([*self.base(), "restore", f"--pg1-path={target}"])

    def repo_size(self) -> int:
        return du(self.repo, skip="archive")


def churn(server: PgServer, scale: int, fraction: float, seed: int) -> None:
    """Update a seeded random set of pgbench_accounts rows spread over ~fraction of its pages."""
    rows = int(scale * 100000 * fraction / 61)  # ~61 accounts rows per 8 KiB page
    server.psql(
        f"select setseed({seed / 1000}); "
        f"update pgbench_accounts set abalance = abalance + 1 "
        f"where aid in (select (random() * {scale * 100000 - 1})::int + 1 from generate_series(1, {rows}));"
    )


def add_incompressible(server: PgServer, mib: int) -> None:
    rows = mib * 1024 // 2
    server.psql(
        "create table noise (id int, data bytea); alter table noise alter column data set storage external;"
        f"insert into noise select g, decode(string_agg(md5(random()::text || g || h), ''), 'hex') "
        f"from generate_series(1, {rows}) g, generate_series(1, 128) h group by g;"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", type=int, default=15)
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--incompressible-mib", type=int, default=0)
    parser.add_argument("--churn", type=float, default=0.02)
    parser.add_argument("--pgbackrest", default=shutil.which("pgbackrest") or "")
    parser.add_argument("--summarize-wal", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--pgbackrest-first", action="store_true",
                        help="start round 0 with pgBackRest (the first full runs once per engine: "
                             "run the benchmark both ways to see the order's effect)")
    parser.add_argument("--restore-only", action="store_true",
                        help="take the full and the incremental once (round 1), then only restore in every round")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="pgvault-bench-", dir="/var/tmp"))
    server = PgServer(args.pg, work / "cluster")
    engines: list[PgVault | PgBackRest] = [PgVault(work, server, args.jobs)]
    if args.pgbackrest:
        engines.append(PgBackRest(work, server, args.jobs, args.pgbackrest))
    # One archive_command feeds both archives, so both engines see identical WAL.
    archive = " && ".join(f"{e.archive_command()}" for e in engines)
    conf = {"max_wal_size": "4GB", "checkpoint_timeout": "30min"}
    if args.summarize_wal:
        conf["summarize_wal"] = "on"
    server.init(archive_command=archive, extra_conf=conf)
    server.start()
    results: dict[str, dict[str, list[float]]] = {e.name: {} for e in engines}
    results["pg_basebackup"] = {}

    def record(engine: str, key: str, value: float) -> None:
        results[engine].setdefault(key, []).append(value)

    try:
        t0 = time.time()
        server.pgbench("-i", "-s", str(args.scale), "-q")
        if args.incompressible_mib:
            add_incompressible(server, args.incompressible_mib)
        server.psql("checkpoint;")
        db_size = int(server.psql("select sum(pg_database_size(oid)) from pg_database"))
        print(f"# data loaded in {time.time() - t0:.0f}s: {db_size / 2**20:.0f} MiB", file=sys.stderr)
        for engine in engines:
            engine.setup()
        # Drain the archive backlog from loading first, or the first backup pays for it.
        server.switch_wal_and_wait_archived(timeout=1800)
        # Write the loaded data back to disk now, or whichever engine runs first pays for the
        # kernel's writeback of it (the first full of the first engine ran up to 2x slower).
        os.sync()
        offset = 1 if args.pgbackrest_first else 0
        for rnd in range(args.rounds):
            order = engines if (rnd + offset) % 2 == 0 else list(reversed(engines))
            backups = rnd == 0 or not args.restore_only
            for engine in order if backups else ():
                before = engine.repo_size()
                s = engine.backup("full")
                # The first full stores everything; later fulls re-read and re-hash everything
                # but pgvault stores only blocks its repository lacks.
                prefix = "first_full" if rnd == 0 else "full"
                record(engine.name, f"{prefix}_wall", s.wall)
                record(engine.name, f"{prefix}_cpu", s.cpu)
                record(engine.name, f"{prefix}_rss_mb", s.rss_mb)
                record(engine.name, f"{prefix}_repo_growth_mb", (engine.repo_size() - before) / 2**20)
            if backups:
                churn(server, args.scale, args.churn, seed=rnd)
                server.psql("checkpoint;")
            for engine in order if backups else ():
                before = engine.repo_size()
                s = engine.backup("incr")
                record(engine.name, "incr_wall", s.wall)
                record(engine.name, "incr_rss_mb", s.rss_mb)
                record(engine.name, "incr_repo_growth_mb", (engine.repo_size() - before) / 2**20)
            for engine in order:
                target = work / f"restore-{engine.name}"
                shutil.rmtree(target, ignore_errors=True)
                s = engine.restore(target)
                record(engine.name, "restore_wall", s.wall)
                record(engine.name, "restore_cpu", s.cpu)
                record(engine.name, "restore_rss_mb", s.rss_mb)
                shutil.rmtree(target, ignore_errors=True)
            if not backups:
                continue
            base = work / "basebackup"
            shutil.rmtree(base, ignore_errors=True)
            s = timed([str(server.bin("pg_basebackup")), "-d", server.conninfo(), "-D", str(base), "-Ft", "-Xfetch", "-cfast"])
            record("pg_basebackup", "full_wall", s.wall)
            record("pg_basebackup", "full_cpu", s.cpu)
            record("pg_basebackup", "full_rss_mb", s.rss_mb)
            record("pg_basebackup", "full_repo_growth_mb", du(base) / 2**20)
            shutil.rmtree(base, ignore_errors=True)
        for engine in engines:
            record(engine.name, "repo_total_mb", engine.repo_size() / 2**20)
    finally:
        server.cleanup()

    medians = {e: {k: statistics.median(v) for k, v in r.items()} for e, r in results.items()}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "pg": args.pg,
        "scale": args.scale,
        "jobs": args.jobs,
        "rounds": args.rounds,
        "incompressible_mib": args.incompressible_mib,
        "churn": args.churn,
        "db_size_mib": round(db_size / 2**20),
        "pgbackrest": engines[1].version if len(engines) > 1 else None,  # type: ignore[union-attr]
        "command": " ".join(sys.argv),
        "restore_only": args.restore_only,
    }
    print(render(meta, medians))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "medians": medians, "raw": results}, indent=1))


def render(meta: dict[str, object], medians: dict[str, dict[str, float]]) -> str:
    keys = sorted({k for m in medians.values() for k in m})
    engines = list(medians)
    lines = [f"pg {meta['pg']}, scale {meta['scale']} ({meta['db_size_mib']} MiB), jobs {meta['jobs']}, "
             f"{meta['rounds']} rounds, incompressible {meta['incompressible_mib']} MiB, churn {meta['churn']}",
             "", "| metric | " + " | ".join(engines) + " | pgvault / pgbackrest |", "|---" * (len(engines) + 2) + "|"]
    for key in keys:
        row = [f"{medians[e][key]:.2f}" if key in medians[e] else "-" for e in engines]
        ratio = "-"
        if "pgbackrest" in medians and key in medians["pgbackrest"] and medians["pgbackrest"][key]:
            ratio = f"{medians['pgvault'][key] / medians['pgbackrest'][key]:.2f}"
        lines.append(f"| {key} | " + " | ".join(row) + f" | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
