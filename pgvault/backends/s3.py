"""Amazon S3 (and S3-compatible stores) through boto3.

Credentials, region and endpoint come from boto3's own chain (AWS_* variables including
AWS_ENDPOINT_URL and AWS_PROFILE, ~/.aws/config, instance roles); the repo-* options
override endpoint, region and addressing style where a user needs to.

Objects above MULTIPART_THRESHOLD go up as a multipart upload with parts sent in parallel:
nothing is visible until CompleteMultipartUpload, and a failed upload is aborted so no parts
linger. put_if_absent sends If-None-Match: * on PutObject or on the completion (AWS enforces
it since 2024; an S3-compatible store that ignores it would make it check-then-put).

SDK retries are off: the retry wrapper owns retrying, with one time budget.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, NoReturn

import boto3
import botocore.exceptions
from botocore.config import Config

from pgvault.backends.base import BackendSettings, ObjectInfo, ObjectNotFound, Properties, TransientBackendError
from pgvault.errors import BackendError, ConfigError

MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 8 << 20
PART_CONCURRENCY = 4

_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted",
}
# Connection refused/reset, timeouts, truncated bodies: worth another try.
_CONNECTION_ERRORS = (
    botocore.exceptions.ConnectionError,  # incl. EndpointConnectionError, ConnectTimeoutError
    botocore.exceptions.HTTPClientError,  # incl. ConnectionClosedError, ReadTimeoutError
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    OSError,
)
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}


class S3Backend:
    properties = Properties(atomic_put_if_absent=True, connections=8, local=False)

    def __init__(
        self,
        bucket: str,
        prefix: str,
        settings: BackendSettings,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        page_size: int = 1000,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.settings = settings
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.page_size = page_size
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path" if settings.s3_path_style else "auto"},
            max_pool_connections=16,
            connect_timeout=10,
            read_timeout=60,
        )
        try:
            self.client = boto3.session.Session().client(
                "s3", endpoint_url=settings.endpoint or None, region_name=settings.region or None, config=config
            )
        except botocore.exceptions.BotoCoreError as exc:  # unknown profile, bad endpoint URL
            raise ConfigError(f"cannot set up S3 client for {self.describe()}: {exc}") from None
        self._extra: dict[str, str] = {}
        if settings.storage_class:
            self._extra["StorageClass"] = settings.storage_class
        if settings.s3_sse_kms_key_id:
            self._extra["ServerSideEncryption"] = "aws:kms"
            self._extra["SSEKMSKeyId"] = settings.s3_sse_kms_key_id

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {self.settings.endpoint}" if self.settings.endpoint else where

    def _key(self, key: str) -> str:
        return self.prefix + key

    # -- errors -----------------------------------------------------------------------------

    def _fail(self, exc: Exception, key: str) -> NoReturn:
        """Map a boto3 failure to pgvault's kinds: not found, transient, or what to fix."""
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code == "NoSuchBucket":
                raise ConfigError(f"bucket {self.bucket} does not exist: create it, or fix --repo") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"object {key} not found in {self.describe()}") from None
            if code in _CREDENTIAL_CODES:
                raise ConfigError(
                    f"S3 rejected the credentials for {self.describe()} ({code}): "
                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
                ) from None
            if status == 403:
                raise ConfigError(
                    f"access denied to {self.describe()} ({code or 403}): "
                    "grant s3:GetObject/PutObject/ListBucket/DeleteObject on the bucket to these credentials"
                ) from None
            if code in _TRANSIENT_CODES or status == 429 or status >= 500:
                raise TransientBackendError(f"S3 {code or status} on {key}") from exc
            raise BackendError(f"S3 request for {key} in {self.describe()} failed: {code} {status}") from None
        if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            raise ConfigError(
                f"no usable AWS credentials for {self.describe()}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run on a host with an instance role"
            ) from None
        if isinstance(exc, botocore.exceptions.ProfileNotFound):
            raise ConfigError(f"AWS profile not found: {exc}") from None
        if isinstance(exc, _CONNECTION_ERRORS):
            raise TransientBackendError(f"S3 connection failed on {key}: {type(exc).__name__}") from exc
        raise BackendError(f"S3 request for {key} in {self.describe()} failed: {exc}") from exc

    def _call(self, key: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            self._fail(exc, key)

    # -- writes -----------------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray) -> None:
        self._write(key, data, conditional=False)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._write(key, data, conditional=True)
        except _PreconditionFailed:
            return False
        return True

    def _write(self, key: str, data: bytes | bytearray, conditional: bool) -> None:
        cond = {"IfNoneMatch": "*"} if conditional else {}
        try:
            if len(data) <= self.multipart_threshold:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data), **cond, **self._extra)
            else:
                self._multipart(key, memoryview(data), cond)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
                raise _PreconditionFailed() from None
            self._fail(exc, key)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            self._fail(exc, key)

    def _multipart(self, key: str, data: memoryview, cond: dict[str, str]) -> None:
        full = self._key(key)
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full, **self._extra)["UploadId"]

        def send(number: int) -> dict[str, Any]:
            start = (number - 1) * self.part_size
            body = data[start : start + self.part_size].tobytes()
            reply = self.client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": reply["ETag"]}

        count = (len(data) + self.part_size - 1) // self.part_size
        try:
            with ThreadPoolExecutor(PART_CONCURRENCY, thread_name_prefix="pgvault-s3-part") as pool:
                parts = list(pool.map(send, range(1, count + 1)))
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}, **cond
            )
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                pass  # a lifecycle rule for incomplete uploads cleans up what this cannot
            raise

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        reply = self._call(key, self.client.get_object)
        return self._read(reply, key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            reply = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}"
            )
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                self.stat_or_raise(key)
                return b""  # offset at or past the end: short read, as the contract says
            self._fail(exc, key)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            self._fail(exc, key)
        return self._read(reply, key)

    def stat_or_raise(self, key: str) -> ObjectInfo:
        info = self.stat(key)
        if info is None:
            raise ObjectNotFound(f"object {key} not found in {self.describe()}")
        return info

    def _read(self, reply: dict[str, Any], key: str) -> bytes:
        try:
            return bytes(reply["Body"].read())
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            self._fail(exc, key)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            reply = self._call(key, self.client.head_object)
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(reply["ContentLength"]))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found: list[ObjectInfo] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix), PaginationConfig={"PageSize": self.page_size}
        )
        try:
            for page in pages:
                for item in page.get("Contents", ()):
                    found.append(ObjectInfo(item["Key"][len(self.prefix) :], int(item["Size"])))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            self._fail(exc, prefix)
        return iter(found)

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object)


class _PreconditionFailed(Exception):
    """Internal: the conditional write found the key present."""
