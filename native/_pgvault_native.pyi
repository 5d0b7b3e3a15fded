# Type stub for the extension module pgvault._native (built from _pgvault_native.pyx).
# Type checkers only find it as pgvault/_native.pyi: see native/build.md.
# Same interface as pgvault/_pure.py; import both through pgvault._accel.

from typing import Any, Callable, Final

from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12 on

IMPL: Final[str]  # "native"

def checksum_page(page: Buffer, blkno: int) -> int:
    """PostgreSQL's pg_checksum_page for one 8192-byte page: 1..65535 (pd_checksum read as 0)."""

def verify_pages(buf: Buffer, first_blkno: int) -> list[int]:
    """Relation-absolute block numbers of non-new pages whose pd_checksum is wrong.

    first_blkno = segno * 131072 + block within the segment file. Releases the GIL.
    """

def block_digests(buf: Buffer, block_size: int) -> bytes:
    """Concatenated xxh3-128 digests (16 bytes, canonical) of each block_size piece."""

def changed_blocks(new_digests: Buffer, old_digests: Buffer, width: int = 16) -> list[int]:
    """Indices whose width-byte digest differs from old_digests or lies beyond its end."""

def index_build(sources: list[tuple[Buffer, int, bytes]], bits: int) -> tuple[bytes, bytes]:
    """A block-index table (48-byte records bucketed by the id's leading bits) and its starts."""

def index_merge(a: bytes, a_starts: bytes, b: bytes, b_starts: bytes) -> tuple[bytes, bytes]:
    """Two tables of the same width as one, bucket by bucket."""

def index_find(data: bytes, starts: bytes, bits: int, block_id: bytes) -> int:
    """Byte offset of block_id's record in data, or -1."""

# -- the read path (verify, restore); REF records: id[32] | offset u64 | length u32 | pack u32 --

def index_locate(data: bytes, starts: bytes, bits: int, ids: Buffer, out: bytearray) -> int:
    """Fill out's 48-byte REF records (one per 32-byte id) from one table; returns how many were found."""

def refs_sort(refs: Buffer) -> bytes:
    """REF records sorted by (pack, offset, length, id), exact duplicates dropped."""

def refs_runs(refs: Buffer, first: int, count: int, max_bytes: int, max_gap: int, max_blocks: int) -> list[tuple[int, int]]:
    """Runs (start, end) of records that one ranged read of one pack serves."""

def open_blocks(data: Buffer, data_offset: int, refs: Buffer, first: int, count: int, key: bytes | None, kind: int,
                dicts: Callable[[int], Any] | None, decompress: bool) -> tuple[bytes | None, bytes | None, list[tuple[int, str]]]:
    """Authenticate (and open) the sealed objects of a ranged read: (plaintexts, u64 spans, faults). Releases the GIL."""

def writeback(fd: int, offset: int, nbytes: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk, without waiting."""

# the write path
BLAKE3_NATIVE: bool

def block_ids(data: Buffer, block_size: int, key: Buffer) -> bytes:
    """Keyed BLAKE3 content ids of each block_size piece, 32 bytes each (without the GIL)."""

def seal_blocks(data: Buffer, block_size: int, ids: Buffer, members: list[int], kind: int, codec: int, level: int,
                zdicts: tuple[object, object], key: bytes | None) -> tuple[bytes, bytes, bytes]:
    """Seal the member blocks of a chunk: (sealed objects, u64 ends, page classes)."""

def bucket_fill(region: bytearray, first: int, bits: int, records: Buffer, carry: bool) -> bytes:
    """Place table records into whole index-file buckets; returns those that ran past the end."""

def bucket_records(region: Buffer) -> bytes:
    """The records of whole index-file buckets, bucket by bucket."""

def disk_locate(fd: int, bits: int, ids: Buffer, out: bytearray) -> int:
    """index_locate against an index file (one pread a lookup, without the GIL)."""
