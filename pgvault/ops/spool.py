"""The spool directory of --archive-async and the background workers that serve it.

Layout under --spool-path: ``<stanza>/push/`` holds ``NAME.ok`` / ``NAME.error`` status
files written by the pusher, ``<stanza>/fetch/`` holds prefetched WAL files, ``NAME.missing``
/ ``NAME.error`` markers and the ``want`` file naming what recovery asks for next. One
worker of each kind runs per stanza, guarded by flock on ``<kind>.lock``.

Workers are forked twice and detached (new session, stdio to ``<kind>.log``), so
archive_command and restore_command return as soon as their own file is settled.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Callable

from pgvault.errors import ConfigError
from pgvault.ops.spool_probe import worker_running

POLL = 0.01  # seconds between status checks in the foreground


def spool_dir(root: str, stanza: str, kind: str) -> Path:
    path = Path(root) / stanza / kind
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use spool directory {path}: {exc.strerror} (set --spool-path)") from None
    return path


class WorkerLock:
    """An flock held by the one running worker; the foreground probes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def held_elsewhere(self) -> bool:
        return worker_running(str(self.path))


def spawn(work: Callable[[], None], log_path: Path) -> None:
    """Run work() in a detached grandchild; returns once the intermediate child has exited."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    code = 0
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        work()
    except BaseException as exc:  # the worker reports through status files; this is a last resort
        sys.stderr.write(f"pgvault worker {os.getpid()}: {type(exc).__name__}: {exc}\n")
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def write_status(path: Path, text: str = "") -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def deadline_after(seconds: float) -> float:
    return time.monotonic() + seconds
