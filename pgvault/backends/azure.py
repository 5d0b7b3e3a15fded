"""Azure Blob Storage through azure-storage-blob.

Credentials, in order: AZURE_STORAGE_CONNECTION_STRING; AZURE_STORAGE_ACCOUNT with
AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN; AZURE_STORAGE_ACCOUNT alone with
azure-identity's DefaultAzureCredential (managed identity, az login) when that package is
installed. --repo-endpoint replaces https://<account>.blob.core.windows.net.

Objects above MAX_SINGLE_PUT go up as staged blocks, MAX_CONCURRENCY at a time, made
visible by one commit of the block list; uncommitted blocks are never visible and the
service discards them. put_if_absent sends If-None-Match: * (on the commit for staged
uploads), which the service checks atomically.

SDK retries are off (retry_total=0): the retry wrapper owns retrying, with one time budget.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NoReturn, TypeVar

import azure.core.exceptions as aexc
from azure.core import MatchConditions
from azure.storage.blob import BlobServiceClient, ContainerClient

from pgvault.backends.base import BackendSettings, ObjectInfo, ObjectNotFound, Properties, TransientBackendError
from pgvault.errors import BackendError, ConfigError

MAX_SINGLE_PUT = 16 << 20
BLOCK_SIZE = 8 << 20
MAX_CONCURRENCY = 4

T = TypeVar("T")


def _service_client(settings: BackendSettings, **kwargs: Any) -> BlobServiceClient:
    env = settings.azure_env
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        try:
            return BlobServiceClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"], **kwargs)
        except ValueError:
            raise ConfigError("AZURE_STORAGE_CONNECTION_STRING is malformed") from None
    account = env.get("AZURE_STORAGE_ACCOUNT")
    if not account:
        raise ConfigError(
            "no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with "
            "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN"
        )
    url = settings.endpoint or f"https://{account}.blob.core.windows.net"
    credential: Any
    if env.get("AZURE_STORAGE_KEY"):
        credential = {"account_name": account, "account_key": env["AZURE_STORAGE_KEY"]}
    elif env.get("AZURE_STORAGE_SAS_TOKEN"):
        credential = env["AZURE_STORAGE_SAS_TOKEN"]
    else:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise ConfigError(
                f"AZURE_STORAGE_ACCOUNT={account} has no key: set AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, "
                "or install azure-identity for managed identity / az login"
            ) from None
        credential = DefaultAzureCredential()
    return BlobServiceClient(url, credential=credential, **kwargs)


class AzureBackend:
    properties = Properties(atomic_put_if_absent=True, connections=8, local=False)

    def __init__(self, container: str, prefix: str, settings: BackendSettings, *, page_size: int = 1000,
                 max_single_put: int = MAX_SINGLE_PUT, block_size: int = BLOCK_SIZE) -> None:
        self.container_name = container
        self.prefix = prefix
        self.settings = settings
        self.page_size = page_size
        service = _service_client(
            settings,
            retry_total=0,
            max_single_put_size=max_single_put,
            max_block_size=block_size,
            connection_timeout=10,
            read_timeout=60,
        )
        self.container: ContainerClient = service.get_container_client(container)
        self._account_url = service.url.split("?")[0]  # a SAS token must never reach a message

    def describe(self) -> str:
        return f"azure://{self.container_name}/{self.prefix} at {self._account_url}"

    def _fail(self, exc: Exception, key: str) -> NoReturn:
        code = getattr(exc, "error_code", None)
        status = getattr(exc, "status_code", None)
        if code == "ContainerNotFound":
            raise ConfigError(f"container {self.container_name} does not exist: create it, or fix --repo") from None
        if isinstance(exc, aexc.ResourceNotFoundError):
            raise ObjectNotFound(f"object {key} not found in {self.describe()}") from None
        if isinstance(exc, aexc.ClientAuthenticationError) or status in (401, 403):
            raise ConfigError(
                f"Azure rejected the credentials for {self.describe()} ({code or status}): check the account key, "
                "SAS token (expiry, permissions racwdl) or connection string"
            ) from None
        if isinstance(exc, aexc.ServiceRequestError | aexc.ServiceResponseError | aexc.IncompleteReadError | OSError):
            raise TransientBackendError(f"Azure connection failed on {key}: {type(exc).__name__}") from exc
        if status is not None and (status == 429 or status >= 500 or status == 408):
            raise TransientBackendError(f"Azure {code or status} on {key}") from exc
        raise BackendError(f"Azure request for {key} in {self.describe()} failed: {code or status or exc}") from None

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (aexc.AzureError, OSError) as exc:
            self._fail(exc, key)

    def _upload(self, key: str, data: bytes | bytearray, **kwargs: Any) -> None:
        tier = {"standard_blob_tier": self.settings.storage_class} if self.settings.storage_class else {}
        self.container.upload_blob(
            self.prefix + key, bytes(data), length=len(data), max_concurrency=MAX_CONCURRENCY, **tier, **kwargs
        )

    def put(self, key: str, data: bytes | bytearray) -> None:
        self._call(key, lambda: self._upload(key, data, overwrite=True))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._upload(key, data, overwrite=False, match_condition=MatchConditions.IfMissing)
        except aexc.ResourceExistsError:
            return False
        except (aexc.AzureError, OSError) as exc:
            self._fail(exc, key)
        return True

    def get(self, key: str) -> bytes:
        return self._call(key, lambda: self.container.download_blob(self.prefix + key).readall())

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            return self.container.download_blob(self.prefix + key, offset=offset, length=length).readall()
        except aexc.HttpResponseError as exc:
            if exc.status_code == 416:
                if self.stat(key) is None:
                    raise ObjectNotFound(f"object {key} not found in {self.describe()}") from None
                return b""  # offset at or past the end: short read, as the contract says
            self._fail(exc, key)
        except (aexc.AzureError, OSError) as exc:
            self._fail(exc, key)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            props = self._call(key, lambda: self.container.get_blob_client(self.prefix + key).get_blob_properties())
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(props.size))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        def collect() -> list[ObjectInfo]:
            blobs = self.container.list_blobs(name_starts_with=self.prefix + prefix, results_per_page=self.page_size)
            return [ObjectInfo(b.name[len(self.prefix) :], int(b.size)) for b in blobs]

        return iter(sorted(self._call(prefix, collect), key=lambda info: info.key))

    def delete(self, key: str) -> None:
        try:
            self._call(key, lambda: self.container.delete_blob(self.prefix + key))
        except ObjectNotFound:
            pass
