"""Shared pytest configuration: PostgreSQL version selection and throwaway servers.

Why: integration tests must run against every supported PostgreSQL major
(``--pg-versions`` / ``PGVAULT_TEST_PG_VERSIONS``), each test getting its own
servers that are reliably stopped afterwards.  Servers need an unprivileged
user; as root, tests that ask for a server are skipped with a pointer to
``scripts/test.sh`` unless ``PGVAULT_REQUIRE_PG=1`` (set by that script) turns
the skip into an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # plain `pytest` (unlike `python -m pytest`) omits the cwd
    sys.path.insert(0, str(_ROOT))

from tests.support.pgserver import ConfValue, PgServer, PgServerFactory, stop_all  # noqa: E402
from tests.support.emulators import azure_cloud_session, cloud, gcs_cloud_session, s3_cloud_session  # noqa: E402,F401

DEFAULT_PG_VERSIONS = "14,15,16,17,18"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-versions",
        default=os.environ.get("PGVAULT_TEST_PG_VERSIONS", DEFAULT_PG_VERSIONS),
        help="comma-separated PostgreSQL majors to test against "
        "(default: $PGVAULT_TEST_PG_VERSIONS or %(default)s)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs real PostgreSQL servers (slower; run via scripts/test.sh)"
    )
    _configure_hypothesis_dir()


def _configure_hypothesis_dir() -> None:
    """Keep hypothesis' example database out of the checkout when asked to.

    scripts/test.sh runs as a user that may not own the checkout, where the
    default ``./.hypothesis`` is unwritable (hypothesis would warn and fall
    back to memory), so it sets ``PGVAULT_HYPOTHESIS_DIR``.
    """
    path = os.environ.get("PGVAULT_HYPOTHESIS_DIR")
    if not path:
        return
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    set_hypothesis_home_dir(path)


def pg_versions(config: pytest.Config) -> list[int]:
    """The PostgreSQL majors selected for this run, in the given order."""
    raw = str(config.getoption("--pg-versions"))
    return [int(v) for v in raw.replace(" ", "").split(",") if v]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that uses the ``pg_major`` fixture over the selected majors."""
    if "pg_major" in metafunc.fixturenames:
        metafunc.parametrize(
            "pg_major", pg_versions(metafunc.config), ids=lambda v: f"pg{v}"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_all()  # belt and braces: fixtures already stop theirs


def _require_unprivileged() -> None:
    if os.geteuid() == 0:
        msg = "PostgreSQL refuses to run as root; use scripts/test.sh (runs pytest as user pgvault)"
        if os.environ.get("PGVAULT_REQUIRE_PG") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def pg_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServerFactory]:
    """Factory ``make(major, *, checksums=True, extra_conf=None, archive_command=None,
    start=True) -> PgServer`` creating fresh clusters under the test's temp dir.
    Every server it made is stopped (immediate) at teardown."""
    _require_unprivileged()
    made: list[PgServer] = []

    def make(
        major: int,
        *,
        checksums: bool = True,
        extra_conf: Mapping[str, ConfValue] | None = None,
        archive_command: str | None = None,
        start: bool = True,
    ) -> PgServer:
        server = PgServer(major, tmp_path_factory.mktemp(f"pg{major}-"))
        made.append(server)
        server.init(checksums=checksums, extra_conf=extra_conf, archive_command=archive_command)
        if start:
            server.start()
        return server

    yield make
    for server in reversed(made):
        server.cleanup()


@pytest.fixture
def pg_wrap_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServerFactory]:
    """Factory ``wrap(data_dir, *, major=None, conf=None, start=True) -> PgServer`` that
    starts an EXISTING data dir (e.g. a restore's output) on a fresh port/socket
    without modifying it; ``conf`` is passed as ``-c`` options.  Stopped at teardown."""
    _require_unprivileged()
    made: list[PgServer] = []

    def wrap(
        data_dir: Path | str,
        *,
        major: int | None = None,
        conf: Mapping[str, ConfValue] | None = None,
        start: bool = True,
    ) -> PgServer:
        server = PgServer.from_data_dir(
            data_dir, tmp_path_factory.mktemp("pgwrap-"), major=major, conf=conf
        )
        made.append(server)
        if start:
            server.start()
        return server

    yield wrap
    for server in reversed(made):
        server.cleanup()


@pytest.fixture
def pg_server(pg_major: int, pg_server_factory: PgServerFactory) -> PgServer:
    """A started server of the parametrized major with default settings."""
    return pg_server_factory(pg_major)
