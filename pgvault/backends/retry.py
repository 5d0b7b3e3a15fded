"""Retry wrapper: the same Backend contract, with transient failures retried.

Backends raise TransientBackendError for what is worth another try (throttling, 5xx,
timeouts, dropped connections) and anything else for what is not; this wrapper never looks
at SDK exceptions. Backoff is exponential with full jitter (sleep a uniform random time up
to base * 2**attempt, capped), so many clients throttled together spread out instead of
retrying in lockstep. The total time per operation is bounded: after the deadline the last
transient error becomes a BackendError that says what was tried.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, Iterator, TypeVar

from pgvault.backends.base import Backend, ObjectInfo, TransientBackendError
from pgvault.errors import BackendError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RetryingBackend:
    """Wraps any backend; SDK-agnostic."""

    def __init__(
        self,
        inner: Backend,
        timeout: float,
        *,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.properties = inner.properties
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._clock = clock
        self.retries = 0  # total retries made, for tests and benchmarks

    def describe(self) -> str:
        return self.inner.describe()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        deadline = self._clock() + self.timeout
        attempt = 0
        while True:
            try:
                return fn()
            except TransientBackendError as exc:
                attempt += 1
                remaining = deadline - self._clock()
                # The last sleep is cut short so one more try lands at the deadline.
                delay = min(remaining, random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt)))
                if remaining <= 0:
                    raise BackendError(
                        f"{what} on {self.describe()} still failing after {attempt} attempts "
                        f"over {self.timeout:g} s: {exc.message} (check the network and endpoint, "
                        "or raise --repo-retry-timeout)"
                    ) from exc
                log.info("%s failed (%s); retry %d in %.2f s", what, exc.message, attempt, delay)
                self.retries += 1
                self._sleep(delay)

    def put(self, key: str, data: bytes | bytearray) -> None:
        self._call(f"put {key}", lambda: self.inner.put(key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A retried conditional write may find its own earlier attempt: the request reached
        the service but the answer was lost. Then the stored bytes are ours, so compare
        them before telling the caller someone else won."""
        failed_before = False

        def attempt() -> bool:
            nonlocal failed_before
            try:
                return self.inner.put_if_absent(key, data)
            except TransientBackendError:
                failed_before = True
                raise

        written = self._call(f"put {key}", attempt)
        if written or not failed_before:
            return written
        return self.get(key) == data

    def get(self, key: str) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get_range(key, offset, length))

    def stat(self, key: str) -> ObjectInfo | None:
        return self._call(f"stat {key}", lambda: self.inner.stat(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # A listing is materialised inside the retry so a failure on page 7 restarts the
        # listing rather than yielding a partial one.
        return iter(self._call(f"list {prefix}", lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))
