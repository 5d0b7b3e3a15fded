"""Typed errors. Each class carries its process exit code; one handler in cli maps them.

Messages are one line: what failed and what to do about it.
"""

from __future__ import annotations


class PgvaultError(Exception):
    """Base of every error pgvault raises on purpose."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PgvaultError):
    """Bad or missing option, unknown stanza, malformed config file."""

    exit_code = 3


class NotFoundError(PgvaultError):
    """A named thing (backup, WAL segment, object) does not exist.

    wal-fetch maps exactly this to exit 1 so PostgreSQL treats it as "no such segment".
    """

    exit_code = 1


class WalNotFoundError(NotFoundError):
    """This WAL file is not in the archive: the one error wal-fetch reports as exit 1."""


class RepositoryError(PgvaultError):
    """The repository is missing, unreadable, or inconsistent with the request."""

    exit_code = 4


class IntegrityError(RepositoryError):
    """Stored bytes failed authentication or a checksum: never use them."""

    exit_code = 5


class PassphraseError(RepositoryError):
    """The passphrase does not open the repository's key."""

    exit_code = 6


class ClusterMismatchError(RepositoryError):
    """The cluster is not the one the stanza was created for (system identifier, version)."""

    exit_code = 7


class PostgresError(PgvaultError):
    """The server could not be reached or refused what was asked of it."""

    exit_code = 8


class WalError(PgvaultError):
    """WAL archiving or fetching failed (conflicting segment, missing WAL for a backup)."""

    exit_code = 9


class RestoreTargetError(PgvaultError):
    """The restore target directory is unsuitable (not empty, not writable)."""

    exit_code = 10


class LockError(PgvaultError):
    """Another process holds a conflicting lock."""

    exit_code = 11


class BackendError(PgvaultError):
    """A storage backend failed in a way that retrying did not fix."""

    exit_code = 12
