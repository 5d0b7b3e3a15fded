from __future__ import annotations

import io
import random
import tarfile

import pytest

from pgvault.errors import PostgresError
from pgvault.pg.tarstream import TarMember, TarStream


class Collect:
    def __init__(self) -> None:
        self.members: list[tuple[TarMember, bytes]] = []
        self._data = bytearray()
        self._current: TarMember | None = None

    def member_start(self, member: TarMember) -> None:
        self._current = member
        self._data = bytearray()

    def member_data(self, data: memoryview) -> None:
        self._data += data

    def member_end(self) -> None:
        assert self._current is not None
        self.members.append((self._current, bytes(self._data)))


def make_tar() -> tuple[bytes, dict[str, bytes]]:
    buf = io.BytesIO()
    contents = {"backup_label": b"START WAL LOCATION: 0/2000028\n", "base/1/1259": random.randbytes(3 * 8192 + 17), "empty": b""}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        d = tarfile.TarInfo("./pg_wal/")
        d.type = tarfile.DIRTYPE
        d.mode = 0o700
        tar.addfile(d)
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pg_tblspc/16384/")
        link.type = tarfile.SYMTYPE
        link.linkname = "/srv/ts"
        tar.addfile(link)
    return buf.getvalue(), contents


@pytest.mark.parametrize("piece", [1, 7, 512, 1000, 32768, 10**9])
def test_parses_in_any_piece_size(piece: int) -> None:
    raw, contents = make_tar()
    sink = Collect()
    stream = TarStream(sink)
    view = memoryview(raw)
    for pos in range(0, len(raw), piece):
        stream.feed(view[pos : pos + piece])
    stream.finish()
    by_name = {m.name: (m, data) for m, data in sink.members}
    assert by_name["pg_wal"][0].type == "d"
    assert by_name["pg_tblspc/16384"][0].type == "l"
    assert by_name["pg_tblspc/16384"][0].linkname == "/srv/ts"
    for name, data in contents.items():
        member, got = by_name[name]
        assert got == data and member.size == len(data) and member.mode == 0o600
        assert member.mtime == 1700000000


def test_truncated_stream_is_an_error() -> None:
    raw, _ = make_tar()
    stream = TarStream(Collect())
    stream.feed(memoryview(raw[:1500]))
    with pytest.raises(PostgresError):
        stream.finish()


def test_corrupt_header_is_an_error() -> None:
    raw = bytearray(make_tar()[0])
    raw[600] ^= 0xFF  # inside the second header
    with pytest.raises(PostgresError, match="checksum"):
        TarStream(Collect()).feed(memoryview(bytes(raw)))



def test_stream_without_end_marker_when_allowed() -> None:
    """PG14 sends no end-of-archive blocks: a clean member boundary must be accepted."""
    raw, _ = make_tar()
    end_of_members = len(raw.rstrip(b"\0"))
    end_of_members += (-end_of_members) % 512
    cut = memoryview(raw[:end_of_members])
    sink = Collect()
    stream = TarStream(sink, end_marker=False)
    stream.feed(cut)
    stream.finish()
    assert len(sink.members) == 5
    strict = TarStream(Collect())
    strict.feed(cut)
    with pytest.raises(PostgresError):
        strict.finish()
