"""Faults: throttling, dropped connections, permanent errors.

The retry wrapper on its own (a scripted flaky backend, a fake clock), then each object-store
backend behind a loopback proxy that answers 503/429 or resets the connection mid-upload:
the outcome must be a retried success with the right bytes, or a clean failure that leaves
no object (and, on S3, no multipart upload) behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Iterator

import pytest

from pgvault.backends.base import ObjectInfo, Properties, TransientBackendError
from pgvault.backends.memory import MemoryBackend
from pgvault.backends.retry import RetryingBackend
from pgvault.errors import BackendError, ConfigError
from tests.support.emulators import Cloud, FakeGcs, apply_env, azurite_connection_string, gcs_cloud
from tests.support.faultproxy import FaultProxy, Request, Rule, Throttle

LARGE = 12 << 20


# -- the wrapper alone ----------------------------------------------------------------------


class Flaky:
    """A memory backend whose next calls fail as scripted."""

    properties = Properties(atomic_put_if_absent=True, connections=1, local=False)

    def __init__(self, failures: list[Exception], write_then_fail: bool = False) -> None:
        self.inner = MemoryBackend()
        self.failures = failures
        self.write_then_fail = write_then_fail
        self.calls = 0

    def describe(self) -> str:
        return "flaky://"

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)

    def put(self, key: str, data: bytes | bytearray) -> None:
        self._maybe_fail()
        self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        if self.write_then_fail and self.failures:
            self.inner.put_if_absent(key, data)  # the request landed, the answer was lost
        self._maybe_fail()
        return self.inner.put_if_absent(key, data)

    def get(self, key: str) -> bytes:
        self._maybe_fail()
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._maybe_fail()
        return self.inner.get_range(key, offset, length)

    def stat(self, key: str) -> ObjectInfo | None:
        self._maybe_fail()
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._maybe_fail()
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._maybe_fail()
        self.inner.delete(key)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_transient_errors_are_retried_with_capped_full_jitter() -> None:
    clock = FakeClock()
    flaky = Flaky([TransientBackendError("503 SlowDown")] * 6)
    wrapped = RetryingBackend(flaky, timeout=600, base_delay=0.1, max_delay=2.0, sleep=clock.sleep, clock=clock)
    wrapped.put("k", b"v")
    assert flaky.inner.get("k") == b"v" and flaky.calls == 7 and wrapped.retries == 6
    for attempt, delay in enumerate(clock.sleeps, start=1):
        assert 0 <= delay <= min(2.0, 0.1 * 2**attempt)


def test_total_retry_time_is_bounded() -> None:
    clock = FakeClock()
    flaky = Flaky([TransientBackendError("connection reset")] * 10_000)
    wrapped = RetryingBackend(flaky, timeout=60, base_delay=0.1, max_delay=5.0, sleep=clock.sleep, clock=clock)
    with pytest.raises(BackendError) as caught:
        wrapped.get("k")
    assert not isinstance(caught.value, TransientBackendError)
    assert 59 < clock.now <= 60 and "attempts over 60 s" in str(caught.value) and "connection reset" in str(caught.value)


def test_permanent_errors_are_not_retried() -> None:
    flaky = Flaky([ConfigError("access denied: grant s3:PutObject")])
    wrapped = RetryingBackend(flaky, timeout=600, sleep=lambda s: None)
    with pytest.raises(ConfigError):
        wrapped.put("k", b"v")
    assert flaky.calls == 1 and wrapped.retries == 0


def test_put_if_absent_recognises_its_own_lost_write() -> None:
    flaky = Flaky([TransientBackendError("reset after the request was sent")], write_then_fail=True)
    wrapped = RetryingBackend(flaky, timeout=60, sleep=lambda s: None)
    assert wrapped.put_if_absent("wal", b"mine") is True
    other = Flaky([TransientBackendError("reset")])
    other.inner.put("wal", b"someone else's")
    assert RetryingBackend(other, timeout=60, sleep=lambda s: None).put_if_absent("wal", b"mine") is False


# -- real SDKs behind a faulty proxy ---------------------------------------------------------

THROTTLES = {
    "s3": Throttle(503),
    "gcs": Throttle(429, b'{"error": {"code": 429, "message": "rate limit exceeded"}}', "application/json"),
    "azure": Throttle(503, b"<Error><Code>ServerBusy</Code><Message>busy</Message></Error>"),
}
FORBIDDEN = {
    "s3": Throttle(403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"),
    "gcs": Throttle(403, b'{"error": {"code": 403, "message": "forbidden"}}', "application/json"),
    "azure": Throttle(403, b"<Error><Code>AuthorizationPermissionMismatch</Code><Message>no</Message></Error>"),
}
SMALL_PARTS = {
    "s3": {"multipart_threshold": 6 << 20, "part_size": 5 << 20},
    "gcs": {},
    "azure": {"max_single_put": 4 << 20, "block_size": 4 << 20},
}


@dataclass
class Proxied:
    kind: str
    cloud: Cloud  # direct to the emulator, for setup and inspection
    proxy: FaultProxy

    def backend(self, bucket: str, timeout: float = 30) -> RetryingBackend:
        settings = self.cloud.settings
        if self.kind == "s3":
            settings = replace(settings, endpoint=self.proxy.url)
        elif self.kind == "azure":
            settings = replace(settings, azure_env={"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(self.proxy.url)})
        inner = replace(self.cloud, settings=settings).backend(bucket, "", **SMALL_PARTS[self.kind])
        return RetryingBackend(inner, timeout=timeout, base_delay=0.05, max_delay=1.0)


@pytest.fixture(scope="module")
def gcs_behind_proxy() -> Iterator[tuple[Cloud, FaultProxy]]:
    """fake-gcs-server hands out resumable-upload URLs under its external URL: point that
    at the proxy so chunk uploads pass through it too."""
    proxy = FaultProxy()
    emulator = FakeGcs(external_url=proxy.url)
    try:
        emulator.start()
    except Exception as exc:  # missing emulator: same policy as the session fixtures
        proxy.close()
        emulator.cleanup()
        if os.environ.get("PGVAULT_REQUIRE_EMULATORS") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    proxy.upstream_port = emulator.port
    yield gcs_cloud(emulator), proxy
    proxy.close()
    emulator.cleanup()


@pytest.fixture(params=["s3", "gcs", "azure"])
def proxied(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxied]:
    if request.param == "gcs":
        cloud, proxy = request.getfixturevalue("gcs_behind_proxy")
        proxy.rules, proxy.requests, proxy.throttle = [], 0, THROTTLES["gcs"]
        apply_env(monkeypatch, cloud)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield Proxied("gcs", cloud, proxy)
        proxy.rules = []
        return
    cloud = request.getfixturevalue(f"{request.param}_cloud_session")
    apply_env(monkeypatch, cloud)
    proxy = FaultProxy(upstream_port=cloud.emulator.port, throttle=THROTTLES[request.param])
    yield Proxied(request.param, cloud, proxy)
    proxy.close()


def uploads(r: Request) -> bool:
    return r.method in ("PUT", "POST") and r.length > (1 << 20)


def assert_nothing_visible(p: Proxied, bucket: str, key: str) -> None:
    direct = p.cloud.backend(bucket, "")
    assert direct.stat(key) is None
    assert [o.key for o in direct.list("")] == []
    if p.kind == "s3":
        import boto3

        s3 = boto3.client("s3", endpoint_url=p.cloud.emulator.url, region_name="us-east-1")
        assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_throttling_ends_in_retried_success(proxied: Proxied) -> None:
    proxied.proxy.throttle = THROTTLES[proxied.kind]
    bucket = proxied.cloud.new_bucket()
    proxied.proxy.rules = [Rule("throttle", times=3)]
    backend = proxied.backend(bucket)
    data = os.urandom(LARGE)
    backend.put("packs/00/big", data)
    assert backend.put_if_absent("wal/one", b"segment") is True
    assert backend.get("packs/00/big") == data
    assert proxied.proxy.rules[0].fired == 3 and backend.retries >= 1


def test_connection_dropped_mid_upload_is_retried(proxied: Proxied) -> None:
    bucket = proxied.cloud.new_bucket()
    proxied.proxy.rules = [Rule("drop", match=uploads, times=2)]
    backend = proxied.backend(bucket)
    data = os.urandom(LARGE)
    assert backend.put_if_absent("stanzas/main/backups/x.manifest", data) is True
    assert proxied.proxy.rules[0].fired == 2
    assert backend.get("stanzas/main/backups/x.manifest") == data
    assert backend.get_range("stanzas/main/backups/x.manifest", LARGE - 10, 10) == data[-10:]


def test_persistent_drops_fail_cleanly_with_nothing_visible(proxied: Proxied) -> None:
    bucket = proxied.cloud.new_bucket()
    proxied.proxy.rules = [Rule("drop", match=uploads, times=None)]
    backend = proxied.backend(bucket, timeout=3)
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend.put("packs/00/big", os.urandom(LARGE))
    assert not isinstance(caught.value, TransientBackendError)
    assert "still failing after" in str(caught.value)
    with pytest.raises(BackendError):
        backend.put_if_absent("stanzas/main/backups/x.manifest", os.urandom(LARGE))
    assert time.monotonic() - started < 30
    proxied.proxy.rules = []
    assert_nothing_visible(proxied, bucket, "packs/00/big")


def test_access_denied_fails_fast_without_retries(proxied: Proxied) -> None:
    bucket = proxied.cloud.new_bucket()
    proxied.proxy.throttle = FORBIDDEN[proxied.kind]
    proxied.proxy.rules = [Rule("throttle", match=lambda r: r.method in ("PUT", "POST"), times=None)]
    backend = proxied.backend(bucket)
    with pytest.raises(ConfigError) as caught:
        backend.put("config", b"x")
    assert proxied.proxy.rules[0].fired == 1 and backend.retries == 0
    assert "access denied" in str(caught.value) or "rejected the credentials" in str(caught.value)


def test_unreachable_endpoint_is_retried_then_fails_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    from pgvault.backends.base import BackendSettings
    from pgvault.backends.registry import open_backend
    from tests.support.pgserver import free_port

    for name, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    port = free_port()  # nothing listens there
    backend = open_backend("s3://bucket/p", BackendSettings(endpoint=f"http://127.0.0.1:{port}", region="us-east-1", retry_timeout=2))
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend.get("config")
    assert not isinstance(caught.value, TransientBackendError)
    assert "still failing after" in str(caught.value) and "connection failed" in str(caught.value)
    assert 1.5 < time.monotonic() - started < 10
