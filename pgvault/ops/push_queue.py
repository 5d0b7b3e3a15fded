"""The pusher's protocol with archive_command (--archive-async), using only os.

The pusher leaves ``NAME.ok`` in the spool's push directory once NAME is durable in the
repository, or ``NAME.error`` with the reason, and holds an flock on ``pusher.lock`` while
it runs. archive_command for NAME succeeds only on its ``.ok``. While a pusher runs, waiting
for that ``.ok`` here costs a polling loop; everything else (no pusher, an error, no answer in
time) goes to the full path in ops/archive_async.py, which starts pushers and reports errors.
"""

from __future__ import annotations

import os
import time

from pgvault.ops.spool_probe import worker_running

LOCK = "pusher.lock"
POLL = 0.005  # seconds between looks for the .ok


def pusher_running(out: str) -> bool:
    return worker_running(os.path.join(out, LOCK))


def push_fast(out: str, name: str, timeout: float) -> int | None:
    """0 once NAME.ok is there; None when the full path must decide."""
    ok, error = os.path.join(out, f"{name}.ok"), os.path.join(out, f"{name}.error")
    if os.path.exists(ok):
        return 0
    if not os.path.isdir(out) or not pusher_running(out):
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(POLL)
        if os.path.exists(ok):
            return 0
        if os.path.exists(error) or not pusher_running(out):
            return None
    return None
