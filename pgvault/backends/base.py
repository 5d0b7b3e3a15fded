"""The backend contract: a handful of synchronous byte operations with stated semantics.

Keys are '/'-separated relative paths (``packs/ab/abcd...``). Every method is safe to call
from several threads at once. Not-found is signalled by ``ObjectNotFound`` (a subclass of
the user-facing NotFoundError) so callers can tell "absent" from "broken".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol

from pgvault.errors import BackendError, NotFoundError


class ObjectNotFound(NotFoundError):
    """The key does not exist."""


class TransientBackendError(BackendError):
    """A failure worth retrying (throttling, timeout, reset); the retry wrapper acts on it."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


@dataclass(frozen=True)
class Properties:
    """What the backend guarantees, so callers never need isinstance checks."""

    # put_if_absent is enforced by the service (not check-then-put).
    atomic_put_if_absent: bool
    # Sensible number of concurrent requests.
    connections: int
    # A local path a key maps to, when the backend is a filesystem (for tests and fsck).
    local: bool


@dataclass(frozen=True)
class BackendSettings:
    """What an object-store backend needs beyond its URL (from the repo-* options).

    Credentials normally come from each SDK's own environment and config files; only the
    Azure variables, which its SDK does not read itself, arrive here (never shown).
    """

    endpoint: str | None = None
    region: str | None = None
    s3_path_style: bool = False
    storage_class: str | None = None
    s3_sse_kms_key_id: str | None = None
    # Seconds the retry wrapper keeps trying one operation before giving up.
    retry_timeout: float = 180.0
    azure_env: Mapping[str, str] = field(default_factory=dict, repr=False)


class Backend(Protocol):
    properties: Properties

    def put(self, key: str, data: bytes | bytearray) -> None:
        """Store data under key, replacing any old value, atomically: readers see old or new."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store data only if key is absent. True if written, False if it already existed."""

    def get(self, key: str) -> bytes:
        """The whole object; ObjectNotFound if absent."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """length bytes from offset; ObjectNotFound if absent; short only at end of object."""

    def stat(self, key: str) -> ObjectInfo | None:
        """Size of the object, or None if absent."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with prefix, in key order."""

    def delete(self, key: str) -> None:
        """Remove key; absent keys are not an error (delete is idempotent)."""

    def describe(self) -> str:
        """A human-readable location without secrets, for messages."""


class Upload(Protocol):
    """One object written piece by piece (packs): nothing is visible under the key until
    commit(), which makes the whole object visible at once; abort() discards what was written
    and may be called at any time, more than once."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class BufferedUpload:
    """The Upload of backends that cannot stream an object: the pieces collect in memory and
    commit() puts them in one call (so the retry wrapper can retry the whole object)."""

    def __init__(self, backend: Backend, key: str) -> None:
        self._backend = backend
        self._key = key
        self._data: bytearray | None = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._data is None:
            raise BackendError(f"write to {self._key} after commit or abort")
        self._data += data

    def commit(self) -> None:
        if self._data is None:
            raise BackendError(f"commit of {self._key} after commit or abort")
        data, self._data = self._data, None
        self._backend.put(self._key, data)

    def abort(self) -> None:
        self._data = None


def open_upload(backend: Backend, key: str) -> Upload:
    """A streaming upload where the backend has one (``open_upload``), else a buffered one."""
    opener = getattr(backend, "open_upload", None)
    return opener(key) if opener is not None else BufferedUpload(backend, key)


def sweep_temp(backend: Backend, prefix: str, older_than: float) -> int:
    """Remove a backend's leftovers of interrupted writes under prefix older than older_than
    seconds (``sweep_temp``: only the filesystem has any; an object store's put is atomic and
    its abandoned multipart uploads are the bucket's lifecycle rules' job). Returns how many."""
    sweeper = getattr(backend, "sweep_temp", None)
    return int(sweeper(prefix, older_than)) if sweeper is not None else 0
