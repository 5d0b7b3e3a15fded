"""Repository locks: conflicts, waiting, staleness judged safely across hosts, lost locks."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from pgvault.errors import LockError
from pgvault.pipeline.envelope import Kind
from pgvault.repository import layout
from pgvault.repository.locks import (
    HostIdentity,
    LockRequest,
    RepositoryLock,
    hold,
    list_locks,
    process_start,
)
from pgvault.repository.repository import Repository
from tests.unit.synthetic import new_repo

BACKUP = LockRequest("backup", stanza="main")
GC = LockRequest("gc", exclusive=True)


@pytest.fixture
def repo() -> Repository:
    return new_repo()


def foreign_lock(repo: Repository, **fields: Any) -> str:
    """A lock object as another process (or host) would have written it."""
    here = HostIdentity.current()
    doc = {"command": "backup", "mode": "shared", "stanza": "main", "host": here.host, "boot_id": here.boot_id,
           "pidns": here.pidns, "pid": 1, "pid_start": process_start(1), "created": "2026-01-01T00:00:00Z",
           "heartbeat": time.time(), "ttl": 900.0, **fields}
    key = layout.lock_key(f"0-{len(list(repo.backend.list('locks/')))}")
    repo.put_json(Kind.LOCK, key, doc)
    return key


def dead_pid() -> tuple[int, str | None]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start(proc.pid)
    proc.wait()
    return proc.pid, start


def test_shared_locks_coexist_and_release(repo: Repository) -> None:
    with hold(repo, LockRequest("restore")), hold(repo, LockRequest("verify")), hold(repo, BACKUP):
        assert len(list_locks(repo)) == 3
    assert list_locks(repo) == []


def test_exclusive_conflicts_both_ways(repo: Repository) -> None:
    with hold(repo, BACKUP):
        with pytest.raises(LockError, match="backup of stanza main") as err:
            hold(repo, GC)
        assert err.value.exit_code == 11
    with hold(repo, GC):
        with pytest.raises(LockError, match="gc"):
            hold(repo, LockRequest("restore"))
    assert list_locks(repo) == []  # the refused attempts left nothing behind


def test_second_backup_of_a_stanza_is_refused_but_another_stanza_runs(repo: Repository) -> None:
    with hold(repo, BACKUP):
        with pytest.raises(LockError, match="backup of stanza main"):
            hold(repo, BACKUP)
        with hold(repo, LockRequest("backup", stanza="other")):
            pass


def test_waits_for_the_holder_within_the_timeout(repo: Repository) -> None:
    first = hold(repo, BACKUP)
    threading.Timer(0.5, first.release).start()
    started = time.monotonic()
    with hold(repo, GC, timeout=10):
        assert time.monotonic() - started >= 0.4


def test_stale_by_heartbeat_is_removed(repo: Repository) -> None:
    old = foreign_lock(repo, host="elsewhere", heartbeat=time.time() - 3600)
    with hold(repo, GC):
        assert repo.backend.stat(old) is None


def test_live_lock_of_another_host_is_respected_whatever_its_pid(repo: Repository) -> None:
    pid, start = dead_pid()
    foreign_lock(repo, host="elsewhere", pid=pid, pid_start=start)
    with pytest.raises(LockError, match="host elsewhere"):
        hold(repo, GC)


def test_dead_process_on_this_host_is_stale(repo: Repository) -> None:
    pid, start = dead_pid()
    old = foreign_lock(repo, pid=pid, pid_start=start)
    with hold(repo, BACKUP):
        assert repo.backend.stat(old) is None


def test_reused_pid_on_this_host_is_stale(repo: Repository) -> None:
    # pid 1 runs, but it is not the process that wrote the lock (another start time).
    old = foreign_lock(repo, pid=1, pid_start="12345")
    with hold(repo, BACKUP):
        assert repo.backend.stat(old) is None


def test_live_process_on_this_host_is_respected(repo: Repository) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as proc:
        try:
            foreign_lock(repo, pid=proc.pid, pid_start=process_start(proc.pid))
            with pytest.raises(LockError, match=f"pid {proc.pid}"):
                hold(repo, BACKUP)
        finally:
            proc.kill()


def test_rebooted_host_is_stale(repo: Repository) -> None:
    here = HostIdentity.current()
    if not here.boot_id:
        pytest.skip("no boot id on this system")
    old = foreign_lock(repo, boot_id="another-boot", pid=1)
    with hold(repo, GC):
        assert repo.backend.stat(old) is None


def test_other_pid_namespace_is_judged_by_heartbeat_only(repo: Repository) -> None:
    pid, start = dead_pid()
    foreign_lock(repo, pidns="pid:[1]", pid=pid, pid_start=start)
    with pytest.raises(LockError):
        hold(repo, GC)


def test_unreadable_lock_blocks_with_a_hint(repo: Repository) -> None:
    repo.backend.put(layout.lock_key("garbage"), b"not a lock")
    with pytest.raises(LockError, match="delete it by hand"):
        hold(repo, GC)


def test_heartbeat_refreshes_and_a_removed_lock_is_lost(repo: Repository) -> None:
    lock = RepositoryLock(repo, BACKUP, refresh=0.05).acquire()
    assert lock.key is not None
    first = repo.get_json(Kind.LOCK, lock.key)["heartbeat"]
    time.sleep(0.3)
    assert repo.get_json(Kind.LOCK, lock.key)["heartbeat"] > first
    lock.ensure_held()
    repo.backend.delete(lock.key)  # another host judged it stale
    with pytest.raises(LockError, match="lost its repository lock"):
        lock.ensure_held()
    lock.release()


def test_staleness_uses_the_ttl_written_in_the_lock(repo: Repository) -> None:
    clock = [1000.0]
    here = replace(HostIdentity.current(), host="me")
    holder = RepositoryLock(repo, BACKUP, ttl=60, refresh=3600, clock=lambda: clock[0], here=here).acquire()
    other = replace(here, host="them")
    clock[0] += 59
    with pytest.raises(LockError):
        RepositoryLock(repo, GC, clock=lambda: clock[0], here=other).acquire()
    clock[0] += 2
    RepositoryLock(repo, GC, clock=lambda: clock[0], here=other).acquire().release()
    with pytest.raises(LockError):
        holder.ensure_held()
    holder.release()
