"""The index's records on local disk, so that memory stays flat as a repository grows.

Held in memory, the index cost 32 bytes a stored block: 6 MB for pgbench scale 100, 19 MB at
scale 300, and about 4 GB for a terabyte of unique 8 KiB blocks. Beyond a small bound
(index.MEMORY_RECORDS) records move into a DiskTable: a temporary file of 2**bits buckets of
4 KiB, each a header and up to 127 records, a record's home bucket being the top bits of its id
(pgvault._pure documents the layout). A lookup reads one bucket with one pread, without the
GIL (disk_locate); pread rather than a memory map because a backup looks up blocks at random,
and every page of a mapped file it touched would count in its memory.

The file is sized for 40 to 80 records a bucket, so a bucket overflows into the next only when
~127 of ~80 expected land in it (rare; linear probing handles it). Records are inserted a
region of buckets at a time in home order (one pread and one pwrite per region: sequential when
many records go in at once, a bucket or two per record when few do); when the file would pass
MAX_FILL records a bucket, a new file twice as large (or more) is built from the old one region
by region. Old files stay open until the index is closed, because a lookup on another thread
may still be reading one.

The file is unlinked from the start (TemporaryFile), in $TMPDIR or /var/tmp, never /tmp,
which is often a tmpfs and so memory again. It is ~64 bytes a stored block on disk.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

from pgvault import _accel
from pgvault.errors import ConfigError

BUCKET = 4096
SLOTS = 127
RECORD = 32
# Records a bucket: a new file is sized for at most FILL, and grows past MAX_FILL.
FILL = 80
MAX_FILL = 100
MIN_BITS = 4
MAX_BITS = 24  # 16M buckets, a 64 GiB file, ~1.3 billion blocks (10 TiB of unique 8 KiB blocks)
# Buckets read and written at once while inserting, and read at once while growing (1 MiB, ~20k
# records: growing builds a table of each region's records, a transient ~2 MB).
REGION_BUCKETS = 256
GROW_REGION_BUCKETS = 256


def bits_for(records: int) -> int:
    """Bucket bits for a file that will hold `records` at most FILL a bucket."""
    bits = MIN_BITS
    while (FILL << bits) < records and bits < MAX_BITS:
        bits += 1
    return bits


def _local_failure(exc: OSError, directory: str) -> ConfigError:
    """One line for a local index file that cannot be created, written or read (a full or
    read-only temporary directory): the way out is another TMPDIR."""
    reason = exc.strerror or str(exc)
    return ConfigError(f"the block index file in {directory} failed: {reason}; set TMPDIR to a writable "
                       "local directory with space (~64 bytes per stored block)")


def spill_directory() -> str:
    """Where index files go: $TMPDIR, else /var/tmp (disk), else the platform's default."""
    configured = os.environ.get("TMPDIR")
    if configured:
        return configured
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


class DiskTable:
    """One index file of 2**bits buckets. Insertion is single-threaded (the Index's lock);
    lookups may run on any thread at the same time, reading buckets with pread."""

    def __init__(self, bits: int) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        self.bits = bits
        self.buckets = 1 << bits
        self.count = 0
        self.directory = spill_directory()
        try:
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix="pgvault-index-")
        except OSError as exc:
            raise _local_failure(exc, self.directory) from exc
        self.fd = self._file.fileno()
        try:
            os.ftruncate(self.fd, self.buckets * BUCKET)  # sparse: unwritten buckets read as empty
        except OSError as exc:
            self._file.close()
            raise _local_failure(exc, self.directory) from exc

    def close(self) -> None:
        self._file.close()

    def room_for(self, records: int) -> bool:
        return self.count + records <= MAX_FILL << self.bits

    def locate(self, ids: bytes | bytearray | memoryview, out: bytearray) -> int:
        """As Index.locate_many for the records still unfound in out (stored length 0)."""
        try:
            return _accel.disk_locate(self.fd, self.bits, ids, out)
        except OSError as exc:
            raise _local_failure(exc, self.directory) from exc

    def insert(self, data: bytes, starts: bytes, table_bits: int) -> None:
        """Add a table's records (index._Table: grouped by the top table_bits bits of the id,
        starts the group boundaries); table_bits must be at least self.bits, so that each of
        this file's buckets is a run of whole groups."""
        shift = table_bits - self.bits
        if shift < 0:
            raise ValueError("the table is coarser than the file")
        bounds = memoryview(starts).cast("I")
        total = bounds[-1]
        if total * RECORD != len(data):
            raise ValueError("starts do not match the records")
        home_shift = 32 - self.bits
        view = memoryview(data)
        carry = b""
        b = 0
        while b < self.buckets:
            if not carry:  # skip to the next bucket that has records
                first = bounds[b << shift]
                if first == total:
                    break
                b = int.from_bytes(view[first * RECORD : first * RECORD + 4], "big") >> home_shift
            end = min(b + REGION_BUCKETS, self.buckets)
            lo, hi = bounds[b << shift], bounds[end << shift]
            if hi > lo:  # end just past the last bucket with records (fewer bytes when sparse)
                last = int.from_bytes(view[(hi - 1) * RECORD : (hi - 1) * RECORD + 4], "big") >> home_shift
                end = last + 1
            else:
                end = b + 1
            carry = self._fill(b, end, carry, view[lo * RECORD : hi * RECORD])
            b = end
        while carry:  # records that ran past the last bucket continue at the first
            b = 0
            while carry and b < self.buckets:
                end = min(b + REGION_BUCKETS, self.buckets)
                carry = self._fill(b, end, carry, b"")
                b = end
            if carry:
                raise ValueError("index file is full")  # unreachable below MAX_FILL < SLOTS
        self.count += total

    def _fill(self, first: int, end: int, carry: bytes, records: memoryview | bytes) -> bytes:
        """Read buckets first..end-1, place carried records (from first on) and records (from
        their homes), write the buckets back; returns what ran past end."""
        region = bytearray(self._read(first, end - first))
        rest = _accel.bucket_fill(region, first, self.bits, carry, True) if carry else b""
        rest += _accel.bucket_fill(region, first, self.bits, records, False)
        try:
            written = os.pwrite(self.fd, region, first * BUCKET)
        except OSError as exc:
            raise _local_failure(exc, self.directory) from exc
        if written != len(region):  # a full file system writes short rather than failing
            raise _local_failure(OSError(f"short write at bucket {first}"), self.directory)
        return rest

    def _read(self, first: int, count: int) -> bytes:
        try:
            region = os.pread(self.fd, count * BUCKET, first * BUCKET)
        except OSError as exc:
            raise _local_failure(exc, self.directory) from exc
        if len(region) != count * BUCKET:
            raise _local_failure(OSError(f"short read at bucket {first}"), self.directory)
        return region

    def records_by_region(self) -> Iterator[bytes]:
        """The file's records, GROW_REGION_BUCKETS buckets at a time (bounded memory)."""
        for first in range(0, self.buckets, GROW_REGION_BUCKETS):
            yield _accel.bucket_records(self._read(first, min(GROW_REGION_BUCKETS, self.buckets - first)))
