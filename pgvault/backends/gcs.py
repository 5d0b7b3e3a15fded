"""Google Cloud Storage through google-cloud-storage.

Credentials are application default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
login, the metadata server); STORAGE_EMULATOR_HOST points the SDK at an emulator and
--repo-endpoint at any other API endpoint.

Objects above 8 MiB go up as a resumable upload in CHUNK_SIZE pieces (GCS's protocol sends
them one after another; nothing is visible until the last one). put_if_absent passes
ifGenerationMatch=0, which the service checks atomically for both upload kinds.

SDK retries are off (retry=None): the retry wrapper owns retrying, with one time budget.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NoReturn, TypeVar

import google.api_core.exceptions as gexc
import google.auth.exceptions
import requests.exceptions
from google.cloud import storage
from google.cloud.storage import exceptions as gcs_exceptions

from pgvault.backends.base import BackendSettings, ObjectInfo, ObjectNotFound, Properties, TransientBackendError
from pgvault.errors import BackendError, ConfigError

CHUNK_SIZE = 8 << 20  # a multiple of 256 KiB, as resumable uploads require
TIMEOUT = (10, 60)  # connect, read seconds

T = TypeVar("T")

_ERRORS = (
    gexc.GoogleAPICallError,
    google.auth.exceptions.GoogleAuthError,
    requests.exceptions.RequestException,
    gcs_exceptions.InvalidResponse,
    gcs_exceptions.DataCorruption,
    OSError,
)


class GcsBackend:
    properties = Properties(atomic_put_if_absent=True, connections=8, local=False)

    def __init__(self, bucket: str, prefix: str, settings: BackendSettings, *, page_size: int = 1000) -> None:
        self.bucket_name = bucket
        self.prefix = prefix
        self.settings = settings
        self.page_size = page_size
        options = {"api_endpoint": settings.endpoint} if settings.endpoint else None
        try:
            self.client = storage.Client(client_options=options)
        except google.auth.exceptions.DefaultCredentialsError:
            raise ConfigError(
                f"no Google credentials for {self.describe()}: set GOOGLE_APPLICATION_CREDENTIALS or run "
                "'gcloud auth application-default login' (STORAGE_EMULATOR_HOST for an emulator)"
            ) from None
        self.bucket = self.client.bucket(bucket)

    def describe(self) -> str:
        where = f"gs://{self.bucket_name}/{self.prefix}"
        return f"{where} at {self.settings.endpoint}" if self.settings.endpoint else where

    def _blob(self, key: str) -> storage.Blob:
        blob = self.bucket.blob(self.prefix + key, chunk_size=CHUNK_SIZE)
        if self.settings.storage_class:
            blob.storage_class = self.settings.storage_class
        return blob

    def _fail(self, exc: Exception, key: str) -> NoReturn:
        if isinstance(exc, gexc.NotFound):
            if "bucket" in str(exc).lower() and "object" not in str(exc).lower():
                raise ConfigError(f"bucket {self.bucket_name} does not exist: create it, or fix --repo") from None
            raise ObjectNotFound(f"object {key} not found in {self.describe()}") from None
        if isinstance(exc, gexc.Unauthorized | google.auth.exceptions.RefreshError):
            raise ConfigError(
                f"GCS rejected the credentials for {self.describe()}: check GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        if isinstance(exc, gexc.Forbidden) and not isinstance(exc, gexc.TooManyRequests):
            raise ConfigError(
                f"access denied to {self.describe()}: grant roles/storage.objectAdmin on the bucket to these credentials"
            ) from None
        if isinstance(exc, gexc.GoogleAPICallError) and (exc.code in (408, 429) or (exc.code or 0) >= 500):
            raise TransientBackendError(f"GCS {exc.code} on {key}") from exc
        if isinstance(exc, requests.exceptions.RequestException | google.auth.exceptions.TransportError | OSError):
            raise TransientBackendError(f"GCS connection failed on {key}: {type(exc).__name__}") from exc
        if isinstance(exc, gcs_exceptions.InvalidResponse | gcs_exceptions.DataCorruption):
            # A truncated or mangled transfer (checksum mismatch, unexpected status mid-upload).
            raise TransientBackendError(f"GCS transfer of {key} failed: {type(exc).__name__}") from exc
        if isinstance(exc, gexc.GoogleAPICallError):
            raise BackendError(f"GCS request for {key} in {self.describe()} failed: {exc.code} {exc.message}") from None
        raise BackendError(f"GCS request for {key} in {self.describe()} failed: {exc}") from exc

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except _ERRORS as exc:
            self._fail(exc, key)

    def put(self, key: str, data: bytes | bytearray) -> None:
        blob = self._blob(key)
        self._call(key, lambda: blob.upload_from_string(bytes(data), retry=None, timeout=TIMEOUT))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        blob = self._blob(key)
        try:
            blob.upload_from_string(data, if_generation_match=0, retry=None, timeout=TIMEOUT)
        except gexc.PreconditionFailed:
            return False
        except _ERRORS as exc:
            self._fail(exc, key)
        return True

    def get(self, key: str) -> bytes:
        blob = self._blob(key)
        try:
            return blob.download_as_bytes(retry=None, timeout=TIMEOUT)
        except gexc.RequestRangeNotSatisfiable:
            # An empty object can answer 416 to the SDK's download request.
            if self.stat(key) == ObjectInfo(key, 0):
                return b""
            raise BackendError(f"GCS refused to read {key} in {self.describe()} (416)") from None
        except _ERRORS as exc:
            self._fail(exc, key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        blob = self._blob(key)
        try:
            return blob.download_as_bytes(start=offset, end=offset + length - 1, retry=None, timeout=TIMEOUT)
        except gexc.RequestRangeNotSatisfiable:
            if self.stat(key) is None:
                raise ObjectNotFound(f"object {key} not found in {self.describe()}") from None
            return b""  # offset at or past the end: short read, as the contract says
        except _ERRORS as exc:
            self._fail(exc, key)

    def stat(self, key: str) -> ObjectInfo | None:
        blob: Any = self._call(key, lambda: self.bucket.get_blob(self.prefix + key, retry=None, timeout=TIMEOUT))
        return None if blob is None else ObjectInfo(key, int(blob.size))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        def collect() -> list[ObjectInfo]:
            blobs = self.client.list_blobs(
                self.bucket, prefix=self.prefix + prefix, page_size=self.page_size, retry=None, timeout=TIMEOUT
            )
            return [ObjectInfo(b.name[len(self.prefix) :], int(b.size)) for b in blobs]

        return iter(sorted(self._call(prefix, collect), key=lambda info: info.key))

    def delete(self, key: str) -> None:
        blob = self._blob(key)
        try:
            self._call(key, lambda: blob.delete(retry=None, timeout=TIMEOUT))
        except ObjectNotFound:
            pass
