"""One explicit table from URL scheme to backend factory.

Factories import their SDK inside the function, so `pgvault wal-push` to a filesystem
repository never pays for boto3 or the Azure/GCS SDKs. Every object-store backend is
wrapped in the retry and read-ahead wrappers here, so no caller can forget them.
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import urlparse

from pgvault.backends.base import Backend, BackendSettings
from pgvault.errors import ConfigError


def _fs(url: str, settings: BackendSettings) -> Backend:
    from pgvault.backends.fs import FsBackend

    path = urlparse(url).path if url.startswith("file://") else url
    if not path.startswith("/"):
        raise ConfigError(f"repository path must be absolute: {url!r}")
    return FsBackend(path)


def _memory(url: str, settings: BackendSettings) -> Backend:
    from pgvault.backends.memory import MemoryBackend

    return MemoryBackend()


def split_bucket_url(url: str) -> tuple[str, str]:
    """scheme://bucket/some/prefix -> ("bucket", "some/prefix/"); the prefix ends in '/' or is empty."""
    parsed = urlparse(url)
    if not parsed.netloc or parsed.query or parsed.fragment or "@" in parsed.netloc:
        raise ConfigError(f"repository URL {url!r} must look like {parsed.scheme}://BUCKET/PREFIX")
    prefix = parsed.path.strip("/")
    if ".." in prefix.split("/") or "//" in prefix:
        raise ConfigError(f"repository URL {url!r} has an invalid prefix")
    return parsed.netloc, prefix + "/" if prefix else ""


def _retrying(backend: Backend, settings: BackendSettings) -> Backend:
    """Object stores: retries around every request, read-ahead around small ranged reads."""
    from pgvault.backends.readahead import ReadAheadBackend
    from pgvault.backends.retry import RetryingBackend

    return ReadAheadBackend(RetryingBackend(backend, settings.retry_timeout))


def _s3(url: str, settings: BackendSettings) -> Backend:
    from pgvault.backends.s3 import S3Backend

    return _retrying(S3Backend(*split_bucket_url(url), settings), settings)


def _gcs(url: str, settings: BackendSettings) -> Backend:
    from pgvault.backends.gcs import GcsBackend

    return _retrying(GcsBackend(*split_bucket_url(url), settings), settings)


def _azure(url: str, settings: BackendSettings) -> Backend:
    from pgvault.backends.azure import AzureBackend

    return _retrying(AzureBackend(*split_bucket_url(url), settings), settings)


FACTORIES: dict[str, Callable[[str, BackendSettings], Backend]] = {
    "": _fs,
    "file": _fs,
    "memory": _memory,
    "s3": _s3,
    "gs": _gcs,
    "azure": _azure,
}

# The extra that brings each SDK, for the message when it is missing.
_EXTRAS = {"s3": "s3", "gs": "gcs", "azure": "azure"}


def open_backend(url: str, settings: BackendSettings | None = None) -> Backend:
    """The backend a --repo URL names."""
    scheme = urlparse(url).scheme if "://" in url else ""
    try:
        factory = FACTORIES[scheme]
    except KeyError:
        known = ", ".join(sorted(s + "://" for s in FACTORIES if s))
        raise ConfigError(f"unsupported repository URL {url!r} (known: /path, {known})") from None
    try:
        return factory(url, settings or BackendSettings())
    except ImportError as exc:
        if scheme not in _EXTRAS:
            raise
        raise ConfigError(
            f"{scheme}:// repositories need the {exc.name} package: pip install 'pgvault[{_EXTRAS[scheme]}]'"
        ) from None
