"""Throwaway PostgreSQL servers for tests.

Why this exists: backup/restore tests need real clusters of several major
versions, each on a private port and socket directory so they never collide
with each other or with a system PostgreSQL, and they must never outlive the
test run.  Every started server is registered and stopped at interpreter exit
(and by the pytest fixtures); start failures raise with the server log's tail.

PostgreSQL refuses to run as root, so this must run as an unprivileged user
(``scripts/test.sh`` arranges that).
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType

from tests.support.pgbins import pg_bindir, pg_env

ConfValue = str | int | float | bool

#: Managed config file (included from postgresql.conf) holding our settings.
MANAGED_CONF = "pgvault_test.conf"

#: Every server not yet cleaned up (running or not: each owns a socket directory).
_ALL: set[PgServer] = set()
_HANDED_OUT_PORTS: set[int] = set()


class PgServerError(RuntimeError):
    """A PostgreSQL command failed; the message carries its output / log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a currently free TCP port on ``host`` not handed out before by this process.

    There is an unavoidable race with other processes between this check and the
    server's bind; :meth:`PgServer.start` retries on a new port if the bind fails.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port
    raise PgServerError("could not find a free TCP port")


def _conf_text(value: ConfValue) -> str:
    """Render a setting's value as PostgreSQL expects it (booleans as on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _quote_conf(value: ConfValue) -> str:
    """Render a value as a postgresql.conf literal (always single-quoted)."""
    return "'" + _conf_text(value).replace("'", "''") + "'"


def _clean_env() -> dict[str, str]:
    """os.environ without libpq/PostgreSQL variables (PGHOST, PGDATA, ...) that would
    redirect our commands to another server; PGVAULT_* is kept."""
    return {
        k: v for k, v in os.environ.items()
        if not (k.startswith("PG") and not k.startswith("PGVAULT"))
    }


def stop_all() -> None:
    """Stop every server this process started (immediate mode) and remove their
    socket directories; registered with atexit."""
    for server in list(_ALL):
        server.cleanup()


atexit.register(stop_all)


class PgServer:
    """One PostgreSQL cluster: either created by :meth:`init`, or an existing data
    directory wrapped by :meth:`from_data_dir` (e.g. the output of a restore).

    ``port`` and ``socket_dir`` are always passed on the postmaster command line,
    so a wrapped data directory is started on fresh ones without being modified.
    """

    def __init__(
        self,
        major: int,
        base_dir: Path | str,
        *,
        data_dir: Path | str | None = None,
        bindir: Path | None = None,
    ) -> None:
        self.major = major
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.bindir = bindir if bindir is not None else pg_bindir(major)
        self.data_dir = Path(data_dir) if data_dir is not None else self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self.port = free_port()
        # Unix socket paths are limited to ~107 bytes, so keep the directory short
        # and outside the (possibly deep) test temp dir.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pgv", dir="/tmp"))
        self.user = "postgres"
        #: True when we own the config (created by init); wrapped dirs stay untouched.
        self._owns_conf = data_dir is None
        #: Settings passed as ``-c`` at start (used for wrapped data dirs).
        self._cmdline_conf: dict[str, str] = {}
        self._managed: dict[str, str] = {}
        self._version_num: int | None = None
        _ALL.add(self)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_data_dir(
        cls,
        data_dir: Path | str,
        base_dir: Path | str,
        *,
        major: int | None = None,
        conf: Mapping[str, ConfValue] | None = None,
    ) -> PgServer:
        """Wrap an existing data directory; ``major`` defaults to its PG_VERSION.

        ``conf`` settings are passed as ``-c`` options at start (the data
        directory's files are not modified), e.g. ``{"archive_mode": "off"}``.
        """
        data = Path(data_dir)
        if major is None:
            major = int((data / "PG_VERSION").read_text().strip())
        server = cls(major, base_dir, data_dir=data)
        for key, value in (conf or {}).items():
            server._cmdline_conf[key] = _conf_text(value)
        return server

    def init(
        self,
        *,
        checksums: bool = True,
        extra_conf: Mapping[str, ConfValue] | None = None,
        archive_command: str | None = None,
    ) -> PgServer:
        """Run initdb and write our configuration; returns self (not started).

        ``archive_command`` also turns ``archive_mode`` on.  ``fsync`` stays on:
        restore tests check crash-consistent copies, so only
        ``synchronous_commit`` is relaxed for speed.
        """
        self._refuse_root()
        args = ["-D", str(self.data_dir), "-U", self.user, "--auth=trust",
                "-E", "UTF8", "--locale=C", "--no-sync"]
        if checksums:
            args.append("--data-checksums")
        elif self.major >= 18:
            args.append("--no-data-checksums")  # checksums are on by default from 18
        self._run([self.bin("initdb"), *args])
        conf: dict[str, ConfValue] = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "synchronous_commit": "off",
            "shared_buffers": "128MB",
            "checkpoint_timeout": "5min",
            "max_wal_size": "1GB",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%a ",
        }
        if archive_command is not None:
            conf["archive_mode"] = "on"
            conf["archive_command"] = archive_command
        conf.update(extra_conf or {})
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write(f"\n# added by tests/support/pgserver.py\ninclude_if_exists '{MANAGED_CONF}'\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "local replication all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
            "host all all ::1/128 trust\n"
            "host replication all ::1/128 trust\n",
            encoding="utf-8",
        )
        self.set_conf(conf)
        return self

    def set_conf(self, settings: Mapping[str, ConfValue] | None = None, **kw: ConfValue) -> None:
        """Set configuration parameters; they take effect on :meth:`reload` or :meth:`restart`
        (as PostgreSQL dictates per parameter, e.g. archive_mode needs a restart).

        For clusters created by :meth:`init` this rewrites the managed include
        file; for wrapped data dirs the values become ``-c`` options of the next start.
        """
        merged = {**(settings or {}), **kw}
        if not self._owns_conf:
            for key, value in merged.items():
                self._cmdline_conf[key] = _conf_text(value)
            return
        for key, value in merged.items():
            self._managed[key] = _quote_conf(value)
        body = "".join(f"{k} = {v}\n" for k, v in self._managed.items())
        tmp = self.data_dir / (MANAGED_CONF + ".tmp")
        tmp.write_text("# managed by tests/support/pgserver.py\n" + body, encoding="utf-8")
        os.replace(tmp, self.data_dir / MANAGED_CONF)

    # -------------------------------------------------------------- lifecycle
    def start(self, *, timeout: int = 120) -> PgServer:
        """Start the server and wait until it accepts connections; returns self.

        Retries on a new port if the chosen one was taken meanwhile.  Raises
        :class:`PgServerError` with the log tail on failure.
        """
        self._refuse_root()
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)  # may have been cleaned up
        _ALL.add(self)
        for attempt in range(3):
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            opts = ["-p", str(self.port), "-k", str(self.socket_dir), "-h", "127.0.0.1"]
            for key, value in self._cmdline_conf.items():
                opts += ["-c", f"{key}={value}"]
            proc = subprocess.run(
                [str(self.bin("pg_ctl")), "start", "-D", str(self.data_dir), "-w",
                 "-t", str(timeout), "-l", str(self.log_file),
                 "-o", " ".join(shlex.quote(o) for o in opts)],
                env=self._proc_env(), capture_output=True, text=True, check=False,
            )
            if proc.returncode == 0:
                self._version_num = None
                return self
            log = self._log_since(log_offset)
            self._kill_leftover()
            if "could not bind" in log or "Address already in use" in log:
                if attempt < 2:
                    self.port = free_port()
                    if self._owns_conf:
                        self.set_conf(port=self.port)
                    continue
            raise PgServerError(
                f"PostgreSQL {self.major} failed to start (data {self.data_dir}):\n"
                f"{proc.stdout}{proc.stderr}\n--- log tail ({self.log_file}) ---\n"
                + "\n".join(log.splitlines()[-40:])
            )
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast", *, timeout: int = 120) -> None:
        """Stop the server (no-op if not running); falls back to immediate mode."""
        if not self.is_running:
            return
        proc = self._pg_ctl("stop", "-m", mode, "-w", "-t", str(timeout))
        if proc.returncode != 0 and mode != "immediate":
            proc = self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "60")
        if proc.returncode != 0 and self.is_running:
            raise PgServerError(f"could not stop PostgreSQL {self.data_dir}:\n{proc.stderr}")

    def restart(self, *, timeout: int = 120) -> PgServer:
        """Stop (fast) and start again, re-applying port, socket dir and ``-c`` options."""
        self.stop()
        return self.start(timeout=timeout)

    def reload(self, *, timeout: float = 30.0) -> None:
        """SIGHUP the server and wait until new sessions see the reloaded config."""
        before = self.psql("select pg_conf_load_time()")
        proc = self._pg_ctl("reload")
        if proc.returncode != 0:
            raise PgServerError(f"pg_ctl reload failed:\n{proc.stdout}{proc.stderr}")
        deadline = time.monotonic() + timeout
        while self.psql("select pg_conf_load_time()") == before:
            if time.monotonic() > deadline:
                raise PgServerError("server did not reload its configuration in time")
            time.sleep(0.05)

    @property
    def is_running(self) -> bool:
        """Whether a postmaster is running on this data directory."""
        return self.data_dir.exists() and self._pg_ctl("status").returncode == 0

    def cleanup(self) -> None:
        """Stop immediately (best effort) and remove the socket directory."""
        try:
            if self.is_running:
                self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "60")
        finally:
            _ALL.discard(self)
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # ---------------------------------------------------------------- clients
    def bin(self, name: str) -> Path:
        """Path of a program in this server's bindir (e.g. ``pg_checksums``)."""
        return self.bindir / name

    def env(self) -> dict[str, str]:
        """Environment pointing libpq tools at this server (PGHOST/PGPORT/PGUSER/PGDATABASE/PGDATA)."""
        env = self._proc_env()
        env.update(
            PGHOST=str(self.socket_dir), PGPORT=str(self.port), PGUSER=self.user,
            PGDATABASE="postgres", PGDATA=str(self.data_dir),
        )
        return env

    def conninfo(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """libpq keyword/value connection string via the Unix socket."""
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user={user}"

    def run_bin(
        self,
        name: str,
        *args: str | os.PathLike[str],
        check: bool = True,
        input: str | None = None,
        timeout: float | None = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Run a program of this server's bindir with :meth:`env` (so pg_checksums /
        pg_controldata find PGDATA and pg_amcheck / pg_basebackup find the server).
        Raises :class:`PgServerError` with stderr if ``check`` and it fails."""
        cmd = [str(self.bin(name)), *map(str, args)]
        proc = subprocess.run(
            cmd, env=self.env(), input=input, capture_output=True, text=True,
            check=False, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise PgServerError(
                f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stderr}\n{proc.stdout}"
            )
        return proc

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL (fed on stdin, so several statements each run on their own) with
        ``psql -XAtq -v ON_ERROR_STOP=1``; returns stdout without the final newline."""
        proc = self.run_bin("psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", db, input=sql)
        return proc.stdout.removesuffix("\n")

    def pgbench(self, *args: str | Iterable[str], db: str = "postgres") -> str:
        """Run pgbench against ``db``; accepts ``pgbench("-i", "-s", "1")`` or a list."""
        flat: list[str] = []
        for arg in args:
            flat.extend([arg] if isinstance(arg, str) else list(arg))
        return self.run_bin("pgbench", *flat, db).stdout

    @property
    def version_num(self) -> int:
        """``server_version_num`` of the running server (e.g. 170011)."""
        if self._version_num is None:
            self._version_num = int(self.psql("show server_version_num"))
        return self._version_num

    def wait_for_recovery_end(self, timeout: float = 120.0) -> None:
        """Block until the server has left recovery (e.g. after replaying restored WAL)."""
        deadline = time.monotonic() + timeout
        while self.psql("select pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise PgServerError(f"still in recovery after {timeout}s; see {self.log_file}")
            time.sleep(0.2)

    def switch_wal_and_wait_archived(self, timeout: float = 60.0) -> str:
        """Switch WAL and wait until the finished segment is archived; returns its name.

        A WAL record is written first: right after another switch (a backup's, say),
        pg_switch_wal() is a no-op, and the wait would end while files such as the
        backup's .backup history file are still queued for the archiver.
        """
        self.psql("create table pgvault_test_switch (); drop table pgvault_test_switch;")
        walfile = self.psql("select pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + timeout
        while True:
            last = self.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver")
            if last[:24] >= walfile:
                return walfile
            if time.monotonic() > deadline:
                failed = self.psql("select last_failed_wal, failed_count from pg_stat_archiver")
                raise PgServerError(
                    f"WAL {walfile} not archived in {timeout}s (last archived {last!r}, "
                    f"failed {failed}); see {self.log_file}"
                )
            time.sleep(0.1)

    # --------------------------------------------------------------- internal
    def _refuse_root(self) -> None:
        if os.geteuid() == 0:
            raise PgServerError(
                "PostgreSQL refuses to run as root; run the tests as an unprivileged "
                "user (scripts/test.sh does this)"
            )

    def _proc_env(self) -> dict[str, str]:
        return pg_env(self.bindir, _clean_env())

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin("pg_ctl")), *args, "-D", str(self.data_dir)],
            env=self._proc_env(), capture_output=True, text=True, check=False,
        )

    def _run(self, cmd: list[str | Path]) -> str:
        proc = subprocess.run(
            [str(c) for c in cmd], env=self._proc_env(), capture_output=True, text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise PgServerError(
                f"{shlex.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, encoding="utf-8", errors="replace") as fh:
                fh.seek(offset)
                return fh.read()
        except FileNotFoundError:
            return "(no log file)"

    def _kill_leftover(self) -> None:
        """After a failed/timed-out start, make sure no postmaster keeps running."""
        if self.is_running:
            self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "60")

    def __repr__(self) -> str:
        return f"PgServer(major={self.major}, port={self.port}, data_dir={str(self.data_dir)!r})"


#: Type of the ``pg_server_factory`` / ``pg_wrap_factory`` fixtures (see tests/conftest.py).
PgServerFactory = Callable[..., PgServer]
