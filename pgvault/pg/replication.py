"""A physical replication connection through psycopg 3's low-level pq API.

psycopg 3 has no replication support, so BASE_BACKUP runs through ``Connection.pgconn``
(research/replication-protocol.md). Every wait goes through select() on the socket with
non-blocking libpq calls: the binary psycopg holds the GIL inside blocking PQgetCopyData,
which would freeze the compression threads for the whole wait.
"""

from __future__ import annotations

import select
from dataclasses import dataclass
from typing import Iterator, Union

import psycopg
from psycopg import pq

from pgvault.errors import PostgresError
from pgvault.pg.wal import parse_lsn, parse_size


@dataclass(frozen=True)
class BackupStart:
    lsn: int
    tli: int


@dataclass(frozen=True)
class TablespaceRow:
    oid: int | None  # None: the main data directory
    location: str | None


@dataclass(frozen=True)
class ArchiveStart:
    """A new tar archive begins: one per tablespace, base.tar last."""

    tablespace_oid: int | None
    location: str | None
    # PG15+ ends each tar with the two zero blocks; PG14's server leaves them out.
    end_marker: bool = True


@dataclass(frozen=True)
class ArchiveData:
    data: memoryview


@dataclass(frozen=True)
class ArchiveEnd:
    pass


@dataclass(frozen=True)
class ManifestData:
    data: memoryview


@dataclass(frozen=True)
class BackupEnd:
    lsn: int
    tli: int


BackupEvent = Union[BackupStart, TablespaceRow, ArchiveStart, ArchiveData, ArchiveEnd, ManifestData, BackupEnd]


@dataclass(frozen=True)
class SystemIdentity:
    system_id: str
    timeline: int
    xlogpos: int


def _text(value: object) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class ReplicationConnection:
    """One walsender session. Use as a context manager; close() aborts any running backup."""

    def __init__(self, conninfo: str, application_name: str = "pgvault") -> None:
        try:
            self._conn = psycopg.connect(
                conninfo, replication="true", autocommit=True, application_name=application_name
            )
        except psycopg.OperationalError as exc:
            raise PostgresError(self._explain_connect_error(str(exc))) from None
        self._pg = self._conn.pgconn

    @staticmethod
    def _explain_connect_error(message: str) -> str:
        line = _first_line(message)
        if "superuser or replication role" in message or "permission denied to start WAL sender" in message:
            return f"cannot start a backup: the role lacks the REPLICATION attribute ({line}); grant it with ALTER ROLE ... REPLICATION"
        if "no pg_hba.conf entry for replication" in message:
            return f"cannot start a backup: {line}; add a 'replication' line to pg_hba.conf"
        return f"cannot connect to PostgreSQL for replication: {line}"

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    @property
    def server_version(self) -> int:
        """server_version_num, e.g. 170011."""
        return self._conn.info.server_version

    def command(self, sql: str) -> list[tuple[str | None, ...]]:
        """A row-returning replication command (simple protocol), text values decoded."""
        try:
            cur = self._conn.execute(sql)
            rows = cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise PostgresError(f"{sql.split()[0]} failed: {_first_line(str(exc))}") from None
        return [tuple(None if v is None else _text(v) for v in row) for row in rows]

    def identify_system(self) -> SystemIdentity:
        sysid, tli, xlogpos, _db = self.command("IDENTIFY_SYSTEM")[0]
        assert sysid is not None and tli is not None and xlogpos is not None
        return SystemIdentity(sysid, int(tli), parse_lsn(xlogpos))

    def show(self, name: str) -> str:
        value = self.command(f"SHOW {name}")[0][0]
        assert value is not None
        return value

    def wal_segment_size(self) -> int:
        return parse_size(self.show("wal_segment_size"))

    def upload_manifest(self, manifest: bytes) -> None:
        """PG17+: give the server the parent's backup_manifest before an INCREMENTAL backup."""
        cur = self._conn.cursor()
        try:
            with cur.copy("UPLOAD_MANIFEST") as copy:
                copy.write(manifest)
        except psycopg.Error as exc:
            raise PostgresError(f"UPLOAD_MANIFEST failed: {_first_line(str(exc))}") from None

    # -- non-blocking waits -------------------------------------------------------------

    def _wait_readable(self) -> None:
        select.select([self._pg.socket], [], [])
        self._pg.consume_input()

    def _get_result(self) -> pq.abc.PGresult | None:
        while self._pg.is_busy():
            self._wait_readable()
        return self._pg.get_result()

    def _copy_chunks(self) -> Iterator[memoryview]:
        """CopyData payloads of the current COPY OUT, until CopyDone."""
        pg = self._pg
        while True:
            n, data = pg.get_copy_data(1)
            if n > 0:
                yield memoryview(data)
            elif n == 0:
                self._wait_readable()
            elif n == -1:
                return
            else:
                raise PostgresError(f"base backup stream failed: {_first_line(pg.error_message.decode('utf-8', 'replace'))}")

    def _drain_and_raise(self, res: pq.abc.PGresult) -> None:
        message = res.error_message.decode("utf-8", "replace")
        while self._get_result() is not None:
            pass
        raise PostgresError(f"base backup failed: {_first_line(message)}")

    @staticmethod
    def _rows(res: pq.abc.PGresult) -> list[list[str | None]]:
        rows = []
        for r in range(res.ntuples):
            rows.append([None if res.get_value(r, c) is None else _text(res.get_value(r, c)) for c in range(res.nfields)])
        return rows

    def base_backup(
        self, label: str, *, fast: bool = True, incremental: bool = False, verify_checksums: bool = True
    ) -> Iterator[BackupEvent]:
        """Run BASE_BACKUP and yield its events in stream order.

        Options: TABLESPACE_MAP so a restore can remap tablespaces; MANIFEST so the server's
        own backup_manifest (needed for PG17 incrementals and pg_verifybackup) is kept;
        WAIT false because pgvault itself waits for the WAL to reach its repository.
        verify_checksums=False leaves page checksums to the client: the walsender's CPU is the
        bottleneck, and a server-side failure would abort the whole backup at its very end.
        """
        new_format = self.server_version >= 150000
        if new_format:
            opts = [f"LABEL {_quote(label)}", f"CHECKPOINT {_quote('fast' if fast else 'spread')}",
                    "WAIT false", "MANIFEST 'yes'", "TABLESPACE_MAP true"]
            if not verify_checksums:
                opts.append("VERIFY_CHECKSUMS false")
            if incremental:
                opts.append("INCREMENTAL")
            sql = f"BASE_BACKUP ({', '.join(opts)})"
        else:
            sql = f"BASE_BACKUP LABEL {_quote(label)} {'FAST ' if fast else ''}NOWAIT MANIFEST 'yes' TABLESPACE_MAP"
            if not verify_checksums:
                sql += " NOVERIFY_CHECKSUMS"
        self._pg.send_query(sql.encode())
        yield from (self._new_format_events() if new_format else self._old_format_events())

    def _new_format_events(self) -> Iterator[BackupEvent]:
        row_sets = 0
        while (res := self._get_result()) is not None:
            status = res.status
            if status == pq.ExecStatus.TUPLES_OK:
                row_sets += 1
                yield from self._row_set_events(row_sets, res)
            elif status == pq.ExecStatus.COPY_OUT:
                in_archive = in_manifest = False
                for chunk in self._copy_chunks():
                    kind = chunk[0]
                    if kind == 0x64:  # 'd'
                        payload = chunk[1:]
                        yield ManifestData(payload) if in_manifest else ArchiveData(payload)
                    elif kind == 0x6E:  # 'n': archive_name \0 tablespace_location \0
                        if in_archive:
                            yield ArchiveEnd()
                        name, location, _ = bytes(chunk[1:]).split(b"\0", 2)
                        stem = name.decode().split(".", 1)[0]
                        in_archive = True
                        yield ArchiveStart(
                            None if stem == "base" else int(stem), location.decode() or None
                        )
                    elif kind == 0x6D:  # 'm'
                        if in_archive:
                            yield ArchiveEnd()
                        in_archive, in_manifest = False, True
                    # 'p' progress messages are ignored
                if in_archive:
                    yield ArchiveEnd()
            elif status == pq.ExecStatus.COMMAND_OK:
                continue
            else:
                self._drain_and_raise(res)

    def _old_format_events(self) -> Iterator[BackupEvent]:
        """PG14: one raw tar COPY per tablespace, in tablespace-row order, then the manifest."""
        row_sets = 0
        tablespaces: list[TablespaceRow] = []
        copies = 0
        while (res := self._get_result()) is not None:
            status = res.status
            if status == pq.ExecStatus.TUPLES_OK:
                row_sets += 1
                for event in self._row_set_events(row_sets, res):
                    if isinstance(event, TablespaceRow):
                        tablespaces.append(event)
                    yield event
            elif status == pq.ExecStatus.COPY_OUT:
                if copies < len(tablespaces):
                    ts = tablespaces[copies]
                    yield ArchiveStart(ts.oid, ts.location, end_marker=False)
                    for chunk in self._copy_chunks():
                        yield ArchiveData(chunk)
                    yield ArchiveEnd()
                else:
                    for chunk in self._copy_chunks():
                        yield ManifestData(chunk)
                copies += 1
            elif status == pq.ExecStatus.COMMAND_OK:
                continue
            else:
                self._drain_and_raise(res)

    def _row_set_events(self, index: int, res: pq.abc.PGresult) -> Iterator[BackupEvent]:
        rows = self._rows(res)
        if index == 1:
            yield BackupStart(parse_lsn(rows[0][0] or "0/0"), int(rows[0][1] or 0))
        elif index == 2:
            for spcoid, location, *_ in rows:
                yield TablespaceRow(int(spcoid) if spcoid else None, location or None)
        else:
            yield BackupEnd(parse_lsn(rows[0][0] or "0/0"), int(rows[0][1] or 0))
