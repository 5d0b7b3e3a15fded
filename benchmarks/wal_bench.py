"""WAL and delta-restore benchmark: pgvault against pgBackRest on one cluster, in one run.

    python -m benchmarks.wal_bench --pg 15 --segments 64 --rounds 3 [--pgbackrest PATH]
        [--pgvault-exe PATH] [--phases recovery,push,delta,load]

Measures, alternating the engines each round (A B, then B A) and reporting medians:
  - sync push: milliseconds per 16 MiB segment for one archive_command call each
    (pgvault wal-push vs pgbackrest archive-push, zstd level 1 both);
  - async push: segments per second draining a backlog of ready segments the way the
    archiver does (one command per segment, in order, .ready renamed to .done on success);
  - recovery: wall time of replaying the archived WAL (--segments x 16 MiB) from the
    archive after a restore, each engine with its asynchronous prefetching fetch;
  - delta restore after --churn of the pages changed: wall time against a fresh restore.
Run as an unprivileged user (PostgreSQL refuses root).

pgvault's archive_command is started the way the installed console script starts it
(``python -c 'from pgvault._fastpath import main ...'``, no runpy), importing this checkout
through PYTHONPATH; --pgvault-exe runs another pgvault instead, e.g. the ``pgvault`` script of a
venv where a wheel is installed (what users run). restore_command is whatever ``pgvault
restore`` writes.

Every recovery also reports the CPU seconds of PostgreSQL's startup process (replay), of the
engine's fetch helpers and of the whole machine (from /proc, every 0.2 s). --trace DIR times
every restore_command call, --py-spy profiles pgvault's prefetcher, --cross recovers each
engine's restored data directory with the other engine's restore_command (which part of a
difference is the data directory's and which the fetch's).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import PgBackRest, PgVault, churn, timed  # noqa: E402
from tests.support.pgserver import PgServer  # noqa: E402


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return time.perf_counter() - start


CHECKOUT = Path(__file__).resolve().parent.parent
# The console script's program (pgvault._fastpath.ENTRY), spelled out so --pgvault-exe can
# point at a pgvault without this checkout's code.
CONSOLE_ENTRY = "import sys; from pgvault._fastpath import main; sys.exit(main())"
VAULT_EXE: list[str] = [sys.executable, "-c", CONSOLE_ENTRY]


def vault_wal_command(engine: PgVault) -> list[str]:
    """engine.base with 'python -m pgvault' replaced by VAULT_EXE."""
    return [*VAULT_EXE, *engine.base[engine.base.index("-m") + 2 :]]


def push_commands(engine: PgVault | PgBackRest, spool: Path, asynchronous: bool, pg_root: Path) -> list[str]:
    extra = ["--compress-level=1"] + (["--archive-async", f"--spool-path={spool}"] if asynchronous else [])
    if isinstance(engine, PgVault):
        return [*vault_wal_command(engine), *extra, "wal-push"]
    return [*engine.base(), *extra, f"--pg1-path={pg_root}", "archive-push"]


def fresh_repo(engine: PgVault | PgBackRest) -> None:
    shutil.rmtree(engine.repo, ignore_errors=True)
    engine.setup()


def drain(engine: PgVault | PgBackRest, segments: list[Path], work: Path, asynchronous: bool) -> float:
    """Archive every segment as the archiver would; returns the wall time."""
    pg_root = work / "pg-root"  # pgBackRest wants pg_wal inside its pg1-path
    wal_dir = pg_root / "pg_wal"
    shutil.rmtree(wal_dir, ignore_errors=True)
    (wal_dir / "archive_status").mkdir(parents=True)
    for seg in segments:
        os.link(seg, wal_dir / seg.name)
        (wal_dir / "archive_status" / f"{seg.name}.ready").touch()
    spool = work / f"spool-{engine.name}"
    shutil.rmtree(spool, ignore_errors=True)
    cmd = push_commands(engine, spool, asynchronous, pg_root)
    start = time.perf_counter()
    for seg in segments:
        run([*cmd, str(wal_dir / seg.name)])
        os.rename(wal_dir / "archive_status" / f"{seg.name}.ready", wal_dir / "archive_status" / f"{seg.name}.done")
    return time.perf_counter() - start


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (user, nice, system, irq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: str) -> tuple[str, float] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return cmdline, (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class CpuTrace:
    """During one recovery, the CPU seconds of the startup process and of the engine's helper
    (pgvault's prefetcher, pgBackRest's async archive-get), sampled from /proc every 0.2 s,
    plus the whole machine's busy CPU; with py_spy, a profile of the helper."""

    def __init__(self, helper_marks: tuple[str, ...], py_spy: Path | None) -> None:
        """helper_marks: strings in a helper's command line. pgvault's prefetcher is forked from a
        restore_command call and has the same command line as the calls, so only processes seen
        in 3 samples count there; pgBackRest's helpers (archive-get:async/:local) live shortly,
        and whatever CPU they spend after the last sample is missed: a lower bound."""
        import threading

        self.min_seen = 1 if any(":" in m for m in helper_marks) else 3
        self.marks, self.py_spy, self.spy = helper_marks, py_spy, None
        self.cpu: dict[tuple[str, str], float] = {}
        self.seen: dict[str, int] = {}  # samples a process was seen in: helpers live long, calls do not
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                got = _process_cpu(pid)
                if not got:
                    continue
                cmdline, seconds = got
                kind = "startup" if "startup recovering" in cmdline else \
                    "helper" if any(m in cmdline for m in self.marks) else None
                if kind:
                    self.cpu[(kind, pid)] = seconds
                    self.seen[pid] = self.seen.get(pid, 0) + 1
                    if kind == "helper" and self.py_spy and self.spy is None and self.seen[pid] == 3:
                        self.spy = subprocess.Popen(["py-spy", "record", "--pid", pid, "--nonblocking", "-r", "200",
                                                     "-f", "raw", "-o", str(self.py_spy)],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "CpuTrace":
        self.busy = _busy_seconds()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.busy = _busy_seconds() - self.busy
        self.stop.set()
        self.thread.join()
        if self.spy:
            self.spy.wait(timeout=30)

    def totals(self) -> dict[str, float]:
        out = {"machine_busy_cpu_s": self.busy}
        for kind in ("startup", "helper"):
            out[f"{kind}_cpu_s"] = sum(v for (k, pid), v in self.cpu.items() if k == kind and self.seen[pid] >= self.min_seen)
        return out


def recover(server_major: int, target: Path, work: Path) -> float:
    """Start a restored cluster and time it until recovery has ended."""
    restored = PgServer.from_data_dir(target, work / f"run-{target.name}", major=server_major, conf={"archive_mode": "off"})
    start = time.perf_counter()
    restored.start(timeout=3600)
    restored.wait_for_recovery_end(timeout=3600)
    elapsed = time.perf_counter() - start
    restored.stop()
    return elapsed


def trace_calls(target: Path, log: Path) -> None:
    """Wrap restore_command so that every call appends 'start end exit-code file' to log."""
    auto = target / "postgresql.auto.conf"
    lines = auto.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("restore_command = '"):
            inner = line[len("restore_command = '") : -1].replace("''", "'")
            wrapped = (f"s=$(date +%s.%N); {{ {inner}; }}; rc=$?; "
                       f"echo \"$s $(date +%s.%N) $rc %f\" >> {shlex.quote(str(log))}; exit $rc")
            lines[i] = "restore_command = '" + wrapped.replace("'", "''") + "'"
    auto.write_text("\n".join(lines) + "\n")


def restore_command_line(target: Path) -> str:
    return next(line for line in (target / "postgresql.auto.conf").read_text().splitlines()
                if line.startswith("restore_command = "))


def set_restore_command_line(target: Path, line: str) -> None:
    auto = target / "postgresql.auto.conf"
    lines = [line if old.startswith("restore_command = ") else old for old in auto.read_text().splitlines()]
    auto.write_text("\n".join(lines) + "\n")


def summarize_calls(log: Path) -> dict[str, float]:
    rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    spans = sorted((float(e) - float(s)) * 1000 for s, e, _, _ in rows)
    if not spans:
        return {}
    return {"restore_calls": len(spans), "restore_call_ms_sum": sum(spans),
            "restore_call_ms_median": statistics.median(spans), "restore_call_ms_max": spans[-1]}


def archive_under_load(engine_kind: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    """A fresh cluster archiving asynchronously with one engine while pgbench writes WAL as fast
    as it can; returns WAL written, the largest backlog of .ready files, and drain time."""
    base = work / f"load-{engine_kind}"
    shutil.rmtree(base, ignore_errors=True)
    server = PgServer(args.pg, base / "cluster")
    engine: PgVault | PgBackRest = PgVault(base, server, args.jobs) if engine_kind == "pgvault" else \
        PgBackRest(base, server, args.jobs, args.pgbackrest)
    spool = base / "spool"
    if isinstance(engine, PgVault):
        command = " ".join([*map(shlex.quote, vault_wal_command(engine)), "--archive-async", f"--spool-path={spool}",
                            "wal-push %p"])
    else:
        command = " ".join([*engine.base(), "--archive-async", f"--spool-path={spool}", "archive-push %p"])
    server.init(archive_command=command, extra_conf={"max_wal_size": "4GB", "checkpoint_timeout": "30min"})
    server.start()
    try:
        engine.setup()
        server.pgbench("-i", "-s", "10", "-q")
        server.switch_wal_and_wait_archived(timeout=600)
        status = server.data_dir / "pg_wal" / "archive_status"
        start_lsn = server.psql("select pg_current_wal_lsn()")
        load = subprocess.Popen([str(server.bin("pgbench")), "-n", "-c", "4", "-j", "2", "-T", str(args.load_seconds),
                                 "postgres"], env=server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        backlog = 0
        while load.poll() is None:
            backlog = max(backlog, len(list(status.glob("*.ready"))))
            time.sleep(0.5)
        mib = float(server.psql(f"select (pg_current_wal_lsn() - '{start_lsn}') / 1048576"))
        stop = time.perf_counter()
        server.switch_wal_and_wait_archived(timeout=3600)
        drain = time.perf_counter() - stop
        failed = int(server.psql("select failed_count from pg_stat_archiver"))
        return {"load_wal_mib_per_s": mib / args.load_seconds, "load_max_ready_backlog": backlog,
                "load_drain_after_s": drain, "load_archive_failures": failed}
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", type=int, default=15)
    parser.add_argument("--segments", type=int, default=64, help="WAL segments generated (64 = 1 GiB)")
    parser.add_argument("--scale", type=int, default=50, help="pgbench scale for the delta restore part")
    parser.add_argument("--churn", type=float, default=0.02)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pgbackrest", default=shutil.which("pgbackrest") or "")
    parser.add_argument("--load-seconds", type=int, default=60, help="pgbench load with async archiving (0: skip)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--pgvault-exe", default=None, help="pgvault for archive_command (default: this checkout)")
    parser.add_argument("--restore-command-c", action="store_true",
                        help="experiment: rewrite pgvault's restore_command from '-S -m pgvault' to '-S -c ENTRY'")
    parser.add_argument("--restore-command-shell", action="store_true",
                        help="experiment: restore_command hands queued files over with the shell")
    parser.add_argument("--trace", default=None, metavar="DIR",
                        help="time every restore_command call (adds two date(1) calls to each) and keep the logs in DIR")
    parser.add_argument("--py-spy", action="store_true", help="with --trace: a py-spy profile of pgvault's prefetcher")
    parser.add_argument("--cross", action="store_true",
                        help="also recover each engine's restored data directory with the other engine's restore_command")
    parser.add_argument("--phases", default="recovery,push,delta,load", help="comma-separated subset to run")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if args.pgvault_exe:
        VAULT_EXE[:] = [args.pgvault_exe]
    else:  # every pgvault that PostgreSQL or this script starts imports this checkout
        os.environ["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *filter(None, [os.environ.get("PYTHONPATH")])])

    work = Path(args.work or tempfile.mkdtemp(prefix="pgvault-walbench-", dir="/var/tmp"))
    server = PgServer(args.pg, work / "cluster")
    vault = PgVault(work, server, args.jobs)
    engines: list[PgVault | PgBackRest] = [vault]
    if args.pgbackrest:
        engines.append(PgBackRest(work, server, args.jobs, args.pgbackrest))
    collected = work / "collected-wal"
    collected.mkdir()
    archive = " && ".join([
        *(" ".join([*map(shlex.quote, vault_wal_command(e)), "wal-push %p"]) if isinstance(e, PgVault) else
          e.archive_command() for e in engines),
        f"cp %p {collected}/%f",
    ])
    server.init(archive_command=archive, extra_conf={"max_wal_size": "4GB", "checkpoint_timeout": "30min"})
    server.start()
    results: dict[str, dict[str, list[float]]] = {e.name: {} for e in engines}

    def record(engine: str, key: str, value: float) -> None:
        results[engine].setdefault(key, []).append(value)
        print(f"# {engine} {key} {value:.3f}", file=sys.stderr)

    try:
        for engine in engines:
            engine.setup()
        pg_root = work / "pg-root"  # stands in for the cluster when pgBackRest archives copied WAL
        (pg_root / "global").mkdir(parents=True)
        shutil.copy(server.data_dir / "global" / "pg_control", pg_root / "global" / "pg_control")
        shutil.copy(server.data_dir / "PG_VERSION", pg_root / "PG_VERSION")
        server.pgbench("-i", "-s", str(args.scale), "-q")
        server.switch_wal_and_wait_archived(timeout=1800)
        for engine in engines:
            engine.backup("full")
        # WAL to replay until --segments segments are written: pgbench (many small records)
        # alternating with bulk inserts (large records), so generating it does not take long.
        start_lsn = server.psql("select pg_current_wal_lsn()")
        server.psql("create table filler (id int, t text)")
        while int(server.psql(f"select floor((pg_current_wal_lsn() - '{start_lsn}') / 16777216)")) < args.segments:
            server.pgbench("-n", "-c", "2", "-T", "5")
            server.psql("insert into filler select g, md5(g::text) from generate_series(1, 300000) g")
        server.switch_wal_and_wait_archived(timeout=3600)
        segments = sorted(p for p in collected.iterdir() if len(p.name) == 24)[-args.segments :]

        crossed: dict[str, Path] = {}
        spool_marks = {"pgvault": (str(work / "fetch-spool-pgvault"),),
                       "pgbackrest": ("archive-get:async", "archive-get:local")}
        for rnd in range(args.rounds if "recovery" in phases else 0):
            order = engines if rnd % 2 == 0 else list(reversed(engines))
            # Recovery of the archived WAL, prefetched asynchronously by both engines.
            for engine in order:
                target = work / f"recover-{engine.name}"
                shutil.rmtree(target, ignore_errors=True)
                spool = work / f"fetch-spool-{engine.name}"
                shutil.rmtree(spool, ignore_errors=True)
                if isinstance(engine, PgVault):
                    run([*engine.base, "restore", f"--pg-data={target}", "--archive-async", f"--spool-path={spool}"])
                    if args.restore_command_c:  # try pgvault._fastpath.self_command's form
                        auto = target / "postgresql.auto.conf"
                        auto.write_text(auto.read_text().replace(
                            " -S -m pgvault ", " -S -c " + shlex.quote(CONSOLE_ENTRY).replace("'", "''") + " "))
                    if args.restore_command_shell:  # try fetch_queue.shell_restore_command
                        from pgvault.ops.fetch_queue import shell_restore_command

                        auto = target / "postgresql.auto.conf"
                        lines = auto.read_text().splitlines()
                        for i, line in enumerate(lines):
                            if line.startswith("restore_command = '"):
                                inner = line[len("restore_command = '") : -1].replace("''", "'")
                                shell = shell_restore_command(str(spool / "bench" / "fetch"), inner)
                                lines[i] = "restore_command = '" + shell.replace("'", "''") + "'"
                        auto.write_text("\n".join(lines) + "\n")
                else:
                    # restore_command inherits the config file: one with the async queue on.
                    conf = work / "pgbackrest-async.conf"
                    conf.write_text(engine.conf.read_text().replace(
                        "[global]\n", "[global]\narchive-async=y\narchive-get-queue-max=256MiB\n", 1
                    ).replace(f"spool-path={work / 'pgbr-spool'}", f"spool-path={spool}"))
                    run([engine.exe, f"--config={conf}", "--stanza=bench", "restore", f"--pg1-path={target}"])
                if args.cross:  # keep it for the crossed recoveries after this round's own
                    crossed[engine.name] = work / f"cross-{engine.name}"
                    shutil.rmtree(crossed[engine.name], ignore_errors=True)
                    shutil.copytree(target, crossed[engine.name], symlinks=True)
                if args.trace:  # instrumented round: its times are not comparable with untraced ones
                    calls = work / f"calls-{engine.name}-{rnd}.log"
                    trace_calls(target, calls)
                    marks = (str(spool),) if isinstance(engine, PgVault) else ("archive-get:async", "archive-get:local")
                    spy = work / f"spy-{engine.name}-{rnd}.txt" if args.py_spy and isinstance(engine, PgVault) else None
                    with CpuTrace(marks, spy) as cpu:
                        record(engine.name, "recovery_wall_s", recover(args.pg, target, work))
                    for key, value in {**cpu.totals(), **summarize_calls(calls)}.items():
                        record(engine.name, key, value)
                    if spy:
                        shutil.copy(spy, Path(args.trace) / spy.name)
                    shutil.copy(calls, Path(args.trace) / calls.name)
                else:
                    with CpuTrace((str(spool),) if isinstance(engine, PgVault) else ("archive-get:async", "archive-get:local"), None) as cpu:
                        record(engine.name, "recovery_wall_s", recover(args.pg, target, work))
                    for key, value in cpu.totals().items():
                        record(engine.name, key, value)
                shutil.rmtree(target, ignore_errors=True)
            if args.cross and len(crossed) == 2:
                # Each engine's restored data directory recovered with the other engine's
                # restore_command: tells the data directory's part of recovery time from the fetch's.
                lines = {n: restore_command_line(d) for n, d in crossed.items()}
                for data_engine in [e.name for e in order]:
                    fetch_engine = "pgvault" if data_engine == "pgbackrest" else "pgbackrest"
                    target = crossed[data_engine]
                    # pgBackRest's names its data directory (--pg1-path), which is gone by now
                    set_restore_command_line(target, lines[fetch_engine].replace(str(work / f"recover-{fetch_engine}"), str(target)))
                    shutil.rmtree(work / f"fetch-spool-{fetch_engine}", ignore_errors=True)
                    with CpuTrace(spool_marks[fetch_engine], None) as cpu:
                        record(fetch_engine, f"crossed_recovery_wall_s (data: {data_engine})", recover(args.pg, target, work))
                    record(fetch_engine, f"crossed_startup_cpu_s (data: {data_engine})", cpu.totals()["startup_cpu_s"])
                for d in crossed.values():
                    shutil.rmtree(d, ignore_errors=True)
                crossed.clear()
        # The push rounds start from empty repositories, so they come after every recovery round.
        for rnd in range(args.rounds if "push" in phases else 0):
            order = engines if rnd % 2 == 0 else list(reversed(engines))
            for engine in order:
                fresh_repo(engine)
                record(engine.name, "sync_push_ms_per_segment", drain(engine, segments, work, False) * 1000 / len(segments))
                fresh_repo(engine)
                record(engine.name, "async_push_segments_per_s", len(segments) / drain(engine, segments, work, True))
        # Delta restore after churn, against a fresh restore (the repositories were renewed above).
        if "delta" in phases:
            for engine in engines:
                engine.backup("full")
            stale = {e.name: work / f"delta-{e.name}" for e in engines}
            for engine in engines:
                shutil.rmtree(stale[engine.name], ignore_errors=True)
                engine.restore(stale[engine.name])
            churn(server, args.scale, args.churn, seed=7)
            server.psql("checkpoint")
            for engine in engines:
                engine.backup("incr")
        for rnd in range(args.rounds if "delta" in phases else 0):
            order = engines if rnd % 2 == 0 else list(reversed(engines))
            for engine in order:
                fresh = work / f"fresh-{engine.name}"
                shutil.rmtree(fresh, ignore_errors=True)
                record(engine.name, "fresh_restore_wall_s", engine.restore(fresh).wall)
                shutil.rmtree(fresh, ignore_errors=True)
                target = stale[engine.name]
                if isinstance(engine, PgVault):
                    sample = timed([*engine.base, "restore", f"--pg-data={target}", "--delta"])
                else:
                    sample = timed([*engine.base(), "restore", f"--pg1-path={target}", "--delta"])
                record(engine.name, "delta_restore_wall_s", sample.wall)
    finally:
        server.cleanup()
    if args.load_seconds and "load" in phases:
        for kind in [e.name for e in engines]:
            for key, value in archive_under_load(kind, args, work).items():
                record(kind, key, value)

    medians = {e: {k: statistics.median(v) for k, v in r.items()} for e, r in results.items()}
    print(f"pg {args.pg}, {args.segments} segments, scale {args.scale}, churn {args.churn}, jobs {args.jobs}, "
          f"{args.rounds} rounds; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{platform.machine()}, {os.cpu_count()} cores; "
          f"{engines[1].version if len(engines) > 1 else 'no pgbackrest'}; "  # type: ignore[union-attr]
          f"pgvault archive_command: {' '.join(VAULT_EXE[:2])} ...")
    print("\n| metric | " + " | ".join(medians) + " | pgvault / pgbackrest |\n" + "|---" * (len(medians) + 2) + "|")
    for key in sorted({k for m in medians.values() for k in m}):
        row = [f"{medians[e].get(key, float('nan')):.3f}" for e in medians]
        ratio = "-"
        if "pgbackrest" in medians and medians["pgbackrest"].get(key) and key in medians.get("pgvault", {}):
            ratio = f"{medians['pgvault'][key] / medians['pgbackrest'][key]:.2f}"
        print(f"| {key} | " + " | ".join(row) + f" | {ratio} |")
    for engine in ("pgvault", "pgbackrest"):
        if engine in medians and medians[engine].get("fresh_restore_wall_s"):
            m = medians[engine]
            print(f"\n{engine}: delta / fresh restore = {m['delta_restore_wall_s'] / m['fresh_restore_wall_s']:.2f}")


if __name__ == "__main__":
    main()
