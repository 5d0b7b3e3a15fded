"""One explicit table from URL scheme to backend factory.

Factories import their SDK inside the function, so `pgvault wal-push` to a filesystem
repository never pays for boto3 or the Azure/GCS SDKs.
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import urlparse

from pgvault.backends.base import Backend
from pgvault.errors import ConfigError


def _fs(url: str) -> Backend:
    from pgvault.backends.fs import FsBackend

    path = urlparse(url).path if url.startswith("file://") else url
    if not path.startswith("/"):
        raise ConfigError(f"repository path must be absolute: {url!r}")
    return FsBackend(path)


def _memory(url: str) -> Backend:
    from pgvault.backends.memory import MemoryBackend

    return MemoryBackend()


FACTORIES: dict[str, Callable[[str], Backend]] = {
    "": _fs,
    "file": _fs,
    "memory": _memory,
}


def open_backend(url: str) -> Backend:
    """The backend a --repo URL names."""
    scheme = urlparse(url).scheme if "://" in url else ""
    try:
        factory = FACTORIES[scheme]
    except KeyError:
        known = ", ".join(sorted(s + "://" for s in FACTORIES if s))
        raise ConfigError(f"unsupported repository URL {url!r} (known: /path, {known})") from None
    return factory(url)
