"""Repository locks: objects under `locks/`, so they work on every backend and across hosts.

Why objects, not lock files: several hosts may share one repository on S3, GCS or Azure, where
there is no flock(2), and a host-local lock cannot stop another host's expire from deleting the
blocks a backup is about to reference (pgBackRest 2.59 fixed exactly that bug).

Protocol, on any store with put-if-absent and read-after-write listing:
1. write our lock object under a fresh random name (put-if-absent);
2. list `locks/`; if a live lock conflicts with ours, delete ours, then wait and retry, or fail.
Each contender lists after its own write, so of two racing contenders at least one sees the
other: both may back off (and retry with jitter), but both can never proceed.

Conflicts: an exclusive lock (expire, gc) conflicts with every other lock. Shared locks
(backup, restore, verify, pin) coexist, except that two locks naming the same `stanza` conflict:
that is how a second backup of one stanza is refused.

Staleness, safe across hosts: the holder rewrites its lock (the heartbeat) every REFRESH
seconds. A lock is stale when its heartbeat is older than its TTL (15 minutes against a 1 minute
refresh, so clock skew between hosts and long pauses do not matter), or when it was written on
this very host (same host name, boot id and pid namespace) by a process that no longer exists
(the pid is gone, or now belongs to a process with another start time). A lock from another host
is never judged by its pid. Whoever finds a stale lock removes it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pgvault.backends.base import ObjectNotFound
from pgvault.errors import LockError, PgvaultError
from pgvault.pipeline.envelope import Kind
from pgvault.repository import layout
from pgvault.repository.repository import Repository

log = logging.getLogger(__name__)

DEFAULT_TTL = 900.0
DEFAULT_REFRESH = 60.0


@dataclass(frozen=True)
class HostIdentity:
    """Enough to tell whether a pid recorded in a lock can be checked from here."""

    host: str
    boot_id: str
    pidns: str

    @classmethod
    def current(cls) -> HostIdentity:
        # os.uname's node name is what socket.gethostname() returns, without importing socket.
        return cls(os.uname().nodename, _read("/proc/sys/kernel/random/boot_id"), _readlink("/proc/self/ns/pid"))


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start: str | None) -> bool:
    """True if pid runs and, when its start time was recorded, is still the same process."""
    if os.path.isdir("/proc/self"):
        now = process_start(pid)
        if now is None:
            return False
        return start is None or now == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockRequest:
    """What a command needs: the repository shared or exclusive, and optionally a stanza to
    itself (a backup)."""

    command: str
    exclusive: bool = False
    stanza: str | None = None


def conflicts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("mode") != "shared" or b.get("mode") != "shared":
        return True
    return a.get("stanza") is not None and a.get("stanza") == b.get("stanza")


def staleness(doc: dict[str, Any], now: float, here: HostIdentity) -> str | None:
    """Why the lock is stale, or None if it must be respected."""
    heartbeat = float(doc.get("heartbeat", 0))
    ttl = float(doc.get("ttl", DEFAULT_TTL))
    if now - heartbeat > ttl:
        return f"no heartbeat for {int(now - heartbeat)}s (ttl {int(ttl)}s)"
    if doc.get("host") != here.host:
        return None
    if doc.get("boot_id") and here.boot_id and doc["boot_id"] != here.boot_id:
        return "its host has rebooted since"
    if doc.get("pidns") != here.pidns:
        return None
    if not process_alive(int(doc.get("pid", 0)), doc.get("pid_start")):
        return f"process {doc.get('pid')} on this host is gone"
    return None


def describe(doc: dict[str, Any]) -> str:
    what = str(doc.get("command", "?"))
    if doc.get("stanza"):
        what += f" of stanza {doc['stanza']}"
    return f"{what} (host {doc.get('host', '?')}, pid {doc.get('pid', '?')}, since {doc.get('created', '?')})"


class RepositoryLock:
    """One lock object, held from acquire() to release(), refreshed by a daemon thread."""

    def __init__(
        self,
        repo: Repository,
        request: LockRequest,
        *,
        ttl: float = DEFAULT_TTL,
        refresh: float = DEFAULT_REFRESH,
        clock: Callable[[], float] = time.time,
        here: HostIdentity | None = None,
    ) -> None:
        self.repo = repo
        self.request = request
        self.ttl = ttl
        self.refresh = refresh
        self.clock = clock
        self.here = here or HostIdentity.current()
        self.key: str | None = None
        self._doc: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # -- acquiring ------------------------------------------------------------------------

    def acquire(self, timeout: float = 0.0) -> RepositoryLock:
        """Take the lock, waiting up to timeout seconds for conflicting holders to finish."""
        deadline = time.monotonic() + timeout
        pid = os.getpid()
        self._doc = {
            "command": self.request.command,
            "mode": "exclusive" if self.request.exclusive else "shared",
            "stanza": self.request.stanza,
            "host": self.here.host,
            "boot_id": self.here.boot_id,
            "pidns": self.here.pidns,
            "pid": pid,
            "pid_start": process_start(pid),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock())),
            "ttl": self.ttl,
        }
        while True:
            self.key = layout.lock_key(f"{int(self.clock())}-{os.urandom(8).hex()}")
            self._doc["heartbeat"] = self.clock()
            self.repo.put_json(Kind.LOCK, self.key, self._doc, if_absent=True)
            holder = self._conflicting_holder()
            if holder is None:
                break
            self.repo.backend.delete(self.key)
            self.key = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                hint = "; wait for it or give --lock-timeout" if timeout == 0 else f" after waiting {timeout:.0f}s"
                raise LockError(f"cannot lock the repository for {self.request.command}: {holder} is running{hint}")
            import random  # only when waiting for a lock

            time.sleep(min(remaining, random.uniform(0.2, 1.0)))
        self._thread = threading.Thread(target=self._heartbeat, name="pgvault-lock", daemon=True)
        self._thread.start()
        return self

    def _conflicting_holder(self) -> str | None:
        """A description of a live lock that conflicts with ours; stale ones are removed."""
        for info in self.repo.backend.list(layout.LOCK_PREFIX):
            if info.key == self.key:
                continue
            try:
                doc = self.repo.get_json(Kind.LOCK, info.key)
            except ObjectNotFound:
                continue  # released meanwhile
            except PgvaultError as exc:
                return f"an unreadable lock {info.key} ({exc}; delete it by hand if no pgvault process runs)"
            if not conflicts(doc, self._doc):
                continue
            why = staleness(doc, self.clock(), self.here)
            if why is not None:
                log.warning("removing stale lock %s of %s: %s", info.key, describe(doc), why)
                self.repo.backend.delete(info.key)
                continue
            return describe(doc)
        return None

    # -- holding --------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        last_ok = self.clock()
        while not self._stop.wait(self.refresh):
            try:
                self.beat()
                last_ok = self.clock()
            except LockError:
                return
            except Exception as exc:  # keep trying: a transient outage must not kill the backup
                log.warning("cannot refresh lock %s: %s", self.key, exc)
                if self.clock() - last_ok > self.ttl:
                    self._lost = f"not refreshed for {int(self.clock() - last_ok)}s"
                    return

    def beat(self) -> None:
        """Rewrite the heartbeat, unless the lock was removed (then it is lost for good)."""
        assert self.key is not None
        if self.repo.backend.stat(self.key) is None:
            self._lost = "removed by another process (judged stale)"
            raise LockError(self._lost)
        self._doc["heartbeat"] = self.clock()
        self.repo.put_json(Kind.LOCK, self.key, self._doc)

    def ensure_held(self) -> None:
        """Call before a step that relies on the lock (a commit, a deletion): LockError if lost."""
        if self._lost is None and (self.key is None or self.repo.backend.stat(self.key) is None):
            self._lost = "removed by another process (judged stale)"
        if self._lost is not None:
            raise LockError(f"{self.request.command} lost its repository lock ({self._lost}): stopped before changing anything more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.key is not None:
            self.repo.backend.delete(self.key)
            self.key = None

    def __enter__(self) -> RepositoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(repo: Repository, request: LockRequest, timeout: float = 0.0) -> RepositoryLock:
    """Acquire and return the lock, for `with hold(...) as lock:`."""
    return RepositoryLock(repo, request).acquire(timeout)


def list_locks(repo: Repository) -> list[dict[str, Any]]:
    """Every readable lock with its key and whether it is stale (for info and monitoring)."""
    here = HostIdentity.current()
    now = time.time()
    out = []
    for info in repo.backend.list(layout.LOCK_PREFIX):
        try:
            doc = repo.get_json(Kind.LOCK, info.key)
        except PgvaultError:
            continue
        why = staleness(doc, now, here)
        out.append({"key": info.key, **{k: doc.get(k) for k in ("command", "mode", "stanza", "host", "pid", "created")},
                    "stale": why})
    return out
