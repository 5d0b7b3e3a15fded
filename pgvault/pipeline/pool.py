"""A bounded worker pool that hands results back in submission order.

Threads, not processes: zstd, lz4, BLAKE3, libsodium and page checksums all release the GIL,
and threads avoid pickling every block across a process boundary. The main thread waits on
the replication socket with the GIL released, so it overlaps with the workers.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class OrderedPool(Generic[T]):
    """submit() work; callbacks run in the submitting thread, in submission order.

    At most max_inflight tasks are queued or running: submit() blocks on the oldest when the
    limit is reached, so memory stays bounded however fast the producer is.
    """

    def __init__(self, jobs: int, max_inflight: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pgvault-worker")
        self._queue: deque[tuple[Future[T], Callable[[T], None]]] = deque()
        self._max = max(1, max_inflight)

    def submit(self, fn: Callable[..., T], *args: object, on_done: Callable[[T], None]) -> None:
        self._queue.append((self._executor.submit(fn, *args), on_done))
        while self._queue and (len(self._queue) > self._max or self._queue[0][0].done()):
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        future, on_done = self._queue.popleft()
        on_done(future.result())

    def finish(self) -> None:
        """Wait for everything submitted and run the remaining callbacks."""
        while self._queue:
            self._complete_oldest()

    def close(self) -> None:
        for future, _ in self._queue:
            future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OrderedPool[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
