"""Pure-Python twin of the native hot loops (``native/_pgvault_native.pyx`` -> ``pgvault._native``).

Same four functions, same results, same exceptions; ``pgvault._accel`` picks one of the two.
Import from ``pgvault._accel``, not from here.

* ``checksum_page(page, blkno)``  -- PostgreSQL's ``pg_checksum_page`` for one 8192-byte page.
* ``verify_pages(buf, first_blkno)`` -- block numbers of pages whose stored pd_checksum is wrong.
  ``first_blkno`` is the block number *within the whole relation* of the first page of ``buf``:
  for segment file ``<relfilenode>.<segno>`` at byte offset ``off`` that is
  ``segno * 131072 + off // 8192`` (RELSEG_SIZE = 131072 blocks of 8192 bytes = 1 GiB).
* ``block_digests(buf, block_size)`` -- concatenated xxh3-128 digests of ``block_size`` pieces.
* ``changed_blocks(new_digests, old_digests, width=16)`` -- indices of digests that differ.
* ``index_build``, ``index_merge``, ``index_find`` -- the block index's tables (repository/index.py).

How the checksum is made fast without numpy
-------------------------------------------
PostgreSQL's algorithm (src/include/storage/checksum_impl.h) views a page as 64 rows of 32
uint32 words and keeps 32 independent FNV-style sums, one per column:
``t = sum ^ word; sum = (t * FNV_PRIME) ^ (t >> 17)`` (mod 2**32), then two rounds of zeros,
then XORs the 32 sums. Python ints are arbitrary-precision, so many sums are packed into
one int, each in its own 64-bit slot, and one big-int operation advances all of them
("SIMD within a register"): a slot holds a value < 2**32, its product with the 25-bit prime
is < 2**57, so nothing carries into the next slot; ``(x >> 17)`` pulls the neighbour's low
bits into the top of each slot, and the final ``& mask`` (low 32 bits of every slot)
discards them together with the high bits of the product.

A row of a page read as 64-bit little-endian slots holds two words per slot, so a row
becomes two packed ints: even columns ``R & mask`` and odd columns ``(R >> 32) & mask``.
``verify_pages`` also packs up to ``_BATCH`` pages side by side (rows transposed so that
row r of every page is contiguous) so each big-int op works on ~8 KiB and interpreter
overhead is amortised. This is ~30x faster than a word-at-a-time loop.

Pages are read as native-endian words, like the server; on a big-endian host the words are
byte-swapped first so that the little-endian packing above still yields native values.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from functools import lru_cache
from operator import index as _index
from operator import itemgetter
from typing import TYPE_CHECKING

import xxhash

from pgvault._faults import FAULT_MESSAGES

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12 on

__all__ = [
    "IMPL", "block_digests", "changed_blocks", "checksum_page", "index_build", "index_find", "index_merge", "verify_pages",
]

IMPL = "python"

BLCKSZ = 8192
RELSEG_SIZE = 131072  # blocks per relation segment file (1 GiB / BLCKSZ)
_N_SUMS = 32
_ROWS = BLCKSZ // (4 * _N_SUMS)  # 64
_ROW_BYTES = 4 * _N_SUMS  # 128
_SLOTS_PER_ROW = _N_SUMS // 2  # 16 64-bit slots, two uint32 words each
_FNV_PRIME = 16777619
_MAX_BLKNO = 0xFFFFFFFF
_DIGEST_SIZE = 16
_BATCH = 64  # pages checksummed together by verify_pages (512 KiB)

_CHECKSUM_BASE_OFFSETS = (
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A,
    0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA,
    0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE,
    0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
    0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
)  # fmt: skip

_LITTLE = sys.byteorder == "little"
# pd_checksum is bytes 8-9 = half of word 2 (slot 1, low half): its low 16 bits when the
# word is little-endian, its high 16 bits when big-endian.
_PD_CHECKSUM_SHIFT = 64 + (0 if _LITTLE else 16)
# (pd_checksum, pd_upper), native byte order, at page offsets 8 and 14.
_HEADER = struct.Struct("=8xH4xH")
# After folding, the low 32 bits of a page's first slot, every 16 slots (128 bytes).
_FOLDED = struct.Struct("<I124x")


def _byte_view(obj: Buffer) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (what PyBUF_SIMPLE accepts)."""
    mv = memoryview(obj)  # TypeError if obj is not a buffer
    if not mv.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _check_blkno(blkno: int, npages: int, name: str) -> int:
    b = _index(blkno)
    last = b + (npages - 1 if npages > 0 else 0)
    if b < 0 or last > _MAX_BLKNO:
        if npages > 1:
            raise ValueError(f"{name}={b} with {npages} pages runs past the largest block number {_MAX_BLKNO}")
        raise ValueError(f"{name} must be in 0..{_MAX_BLKNO}, got {b}")
    return b


def _check_positive(value: int, name: str) -> int:
    v = _index(value)
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    if v > sys.maxsize:
        raise ValueError(f"{name} is too large: {v}")
    return v


def _pack_slots(values: list[int]) -> int:
    return int.from_bytes(struct.pack(f"<{len(values)}Q", *values), "little")


@lru_cache(maxsize=8)
def _constants(k: int) -> tuple[int, int, int, int, Callable[[bytes], tuple[bytes, ...]] | None]:
    """Packed constants for k pages side by side; slot index = page * 16 + column // 2."""
    nslots = k * _SLOTS_PER_ROW
    base_even = _pack_slots([_CHECKSUM_BASE_OFFSETS[2 * q] for _ in range(k) for q in range(16)])
    base_odd = _pack_slots([_CHECKSUM_BASE_OFFSETS[2 * q + 1] for _ in range(k) for q in range(16)])
    low32 = _pack_slots([0xFFFFFFFF] * nslots)
    pd_checksum_bits = 0
    for p in range(k):
        pd_checksum_bits |= 0xFFFF << (p * 16 * 64 + _PD_CHECKSUM_SHIFT)
    clear_pd_checksum = ((1 << (nslots * 64)) - 1) ^ pd_checksum_bits
    # Transpose k pages [page][row] -> [row][page] (row r of every page contiguous).
    transpose = None
    if k > 1:
        transpose = itemgetter(
            *[
                slice(p * BLCKSZ + r * _ROW_BYTES, p * BLCKSZ + (r + 1) * _ROW_BYTES)
                for r in range(_ROWS)
                for p in range(k)
            ]
        )
    return base_even, base_odd, low32, clear_pd_checksum, transpose


def _block_sums(pages: bytes, k: int) -> list[int]:
    """pg_checksum_block (pd_checksum read as 0) of each of the k pages in ``pages``."""
    base_even, base_odd, low32, clear_pd_checksum, transpose = _constants(k)
    if not _LITTLE:
        words = array("I", pages)
        words.byteswap()
        pages = words.tobytes()
    rows = pages if transpose is None else b"".join(transpose(pages))
    view = memoryview(rows)
    row_bytes = k * _ROW_BYTES
    prime = _FNV_PRIME
    from_bytes = int.from_bytes
    even, odd = base_even, base_odd
    for r in range(_ROWS):
        row = from_bytes(view[r * row_bytes : (r + 1) * row_bytes], "little")
        if r == 0:
            row &= clear_pd_checksum
        t = even ^ (row & low32)
        even = ((t * prime) ^ (t >> 17)) & low32
        t = odd ^ ((row >> 32) & low32)
        odd = ((t * prime) ^ (t >> 17)) & low32
    for _ in range(2):
        even = ((even * prime) ^ (even >> 17)) & low32
        odd = ((odd * prime) ^ (odd >> 17)) & low32
    # XOR the 32 sums of each page: its 16 even and 16 odd slots, folded into its first slot.
    folded = even ^ odd
    folded ^= folded >> (8 * 64)
    folded ^= folded >> (4 * 64)
    folded ^= folded >> (2 * 64)
    folded ^= folded >> 64
    return [v for (v,) in _FOLDED.iter_unpack(folded.to_bytes(row_bytes, "little"))]


def _finish(block_sum: int, blkno: int) -> int:
    return ((block_sum ^ blkno) % 65535) + 1


def checksum_page(page: Buffer, blkno: int) -> int:
    """PostgreSQL's pg_checksum_page(page, blkno): uint16 in 1..65535.

    ``page`` is any C-contiguous buffer of exactly 8192 bytes; its pd_checksum field
    (bytes 8-9) is treated as zero and is not modified. ``blkno`` is the block number within
    the relation (see ``verify_pages``), 0..2**32-1. Does not skip new pages.
    """
    mv = _byte_view(page)
    if mv.nbytes != BLCKSZ:
        raise ValueError(f"a page is {BLCKSZ} bytes, got {mv.nbytes}")
    b = _check_blkno(blkno, 1, "blkno")
    data = page if type(page) is bytes else mv.tobytes()
    return _finish(_block_sums(data, 1)[0], b)


def verify_pages(buf: Buffer, first_blkno: int) -> list[int]:
    """Absolute block numbers of the pages in ``buf`` that fail their checksum.

    ``buf`` is a C-contiguous buffer whose length is a multiple of 8192. Page i has block
    number ``first_blkno + i``, where ``first_blkno`` is the block number within the whole
    relation, not within the segment file: for segment ``<relfilenode>.<segno>`` read from
    byte offset ``off`` pass ``segno * 131072 + off // 8192`` (RELSEG_SIZE = 131072).
    New pages (pd_upper == 0, which includes all-zero pages) are skipped, as pg_checksums
    does.
    """
    mv = _byte_view(buf)
    if mv.nbytes % BLCKSZ:
        raise ValueError(f"buffer length {mv.nbytes} is not a multiple of {BLCKSZ}")
    npages = mv.nbytes // BLCKSZ
    first = _check_blkno(first_blkno, npages, "first_blkno")
    bad: list[int] = []
    for start in range(0, npages, _BATCH):
        k = min(_BATCH, npages - start)
        chunk = mv[start * BLCKSZ : (start + k) * BLCKSZ].tobytes()
        headers = [_HEADER.unpack_from(chunk, p * BLCKSZ) for p in range(k)]
        if not any(upper for _, upper in headers):
            continue  # all new pages
        sums = _block_sums(chunk, k)
        for p, ((stored, upper), s) in enumerate(zip(headers, sums)):
            blkno = first + start + p
            if upper != 0 and stored != _finish(s, blkno):
                bad.append(blkno)
    return bad


def block_digests(buf: Buffer, block_size: int) -> bytes:
    """xxh3-128 digests (16 bytes each, canonical big-endian) of each ``block_size`` piece.

    The last piece may be short; an empty buffer gives ``b""``. Equal to
    ``b"".join(xxhash.xxh3_128_digest(piece) for piece in pieces)``.
    """
    bs = _check_positive(block_size, "block_size")
    mv = _byte_view(buf)
    digest = xxhash.xxh3_128_digest
    return b"".join([digest(mv[i : i + bs]) for i in range(0, mv.nbytes, bs)])


def changed_blocks(new_digests: Buffer, old_digests: Buffer, width: int = 16) -> list[int]:
    """Indices i whose ``width``-byte digest in ``new_digests`` differs from the one in
    ``old_digests``, or that lie beyond the end of ``old_digests``.

    Both lengths must be multiples of ``width``.
    """
    w = _check_positive(width, "width")
    new = _byte_view(new_digests)
    old = _byte_view(old_digests)
    if new.nbytes % w:
        raise ValueError(f"new_digests length {new.nbytes} is not a multiple of width {w}")
    if old.nbytes % w:
        raise ValueError(f"old_digests length {old.nbytes} is not a multiple of width {w}")
    n_new = new.nbytes // w
    common = min(n_new, old.nbytes // w)
    a = new[: common * w].tobytes()
    b = old[: common * w].tobytes()
    changed: list[int] = []
    if a != b:
        # Compare runs of digests first so unchanged stretches cost one bytes comparison.
        run = 256
        for lo in range(0, common, run):
            hi = min(lo + run, common)
            if a[lo * w : hi * w] != b[lo * w : hi * w]:
                changed.extend(i for i in range(lo, hi) if a[i * w : (i + 1) * w] != b[i * w : (i + 1) * w])
    changed.extend(range(common, n_new))
    return changed


# -- the block index (pgvault/repository/index.py) ------------------------------------------
# A table is `data`: records of 48 bytes (a 32-byte block id first), grouped in 2**bits buckets
# by the id's leading bits, and `starts`: 2**bits + 1 native uint32 record numbers, bucket b
# being records starts[b] .. starts[b+1]-1.

_RECORD = 48  # a REF record (the read path)
_ID = 32
# A table record: the block id's first 16 bytes (the key), offset u64, stored length u32, pack
# number u32. Index ENTRY records (id, offset, length) are 44 bytes.
_TREC = 32
_KEY = 16
_ENTRY = 44
_PREFIXES = {_ENTRY: struct.Struct(">I40x"), _TREC: struct.Struct(">I28x")}


def index_build(sources: list[tuple[Buffer, int, bytes]], bits: int) -> tuple[bytes, bytes]:
    """One table from sources, a list of (records, stride, tail): 44-byte index ENTRY records
    (id, offset, length) with a 4-byte tail (the pack number), or 32-byte table records with
    an empty tail. Returns (data, starts) as bytes."""
    nbits = _index(bits)
    if not 1 <= nbits <= 24:
        raise ValueError(f"bits must be in 1..24, got {nbits}")
    for _, stride, tail in sources:
        if not ((stride == _ENTRY and len(tail) == 4) or (stride == _TREC and len(tail) == 0)):
            raise ValueError("records must be 44 bytes with a 4-byte tail, or 32 bytes with none")
    shift = 32 - nbits
    counts = array("I", bytes(4 * ((1 << nbits) + 1)))
    total = 0
    for body, stride, _ in sources:
        view = _byte_view(body)
        if len(view) % stride:
            raise ValueError(f"records of {len(view)} bytes are not a multiple of {stride}")
        for (prefix,) in _PREFIXES[stride].iter_unpack(view):
            counts[(prefix >> shift) + 1] += 1
        total += len(view) // stride
    for b in range(1, len(counts)):
        counts[b] += counts[b - 1]
    starts = counts.tobytes()
    out = bytearray(total * _TREC)
    for body, stride, tail in sources:
        view = _byte_view(body)
        for pos, (prefix,) in zip(range(0, len(view), stride), _PREFIXES[stride].iter_unpack(view)):
            b = prefix >> shift
            dst = counts[b] * _TREC
            counts[b] += 1
            if stride == _TREC:
                out[dst : dst + _TREC] = view[pos : pos + _TREC]
            else:
                out[dst : dst + _KEY] = view[pos : pos + _KEY]
                out[dst + _KEY : dst + _TREC] = bytes(view[pos + _ID : pos + _ENTRY]) + tail
    return bytes(out), starts


def index_merge(a: bytes, a_starts: bytes, b: bytes, b_starts: bytes) -> tuple[bytes, bytes]:
    """One table holding the records of two tables of the same width, bucket by bucket."""
    if len(a_starts) != len(b_starts) or len(a_starts) % 4 or len(a_starts) < 8:
        raise ValueError("tables of different widths")
    sa, sb = array("I", a_starts), array("I", b_starts)
    if sa[-1] * _TREC != len(a) or sb[-1] * _TREC != len(b):
        raise ValueError("starts do not match the records")
    parts = []
    for k in range(len(sa) - 1):
        parts.append(a[sa[k] * _TREC : sa[k + 1] * _TREC])
        parts.append(b[sb[k] * _TREC : sb[k + 1] * _TREC])
    return b"".join(parts), array("I", (x + y for x, y in zip(sa, sb))).tobytes()


_U32_PAIR = struct.Struct("=II")


def index_find(data: bytes, starts: bytes, bits: int, block_id: bytes) -> int:
    """Byte offset in data of the record of block_id (its first 16 bytes), or -1."""
    if len(block_id) != _ID:
        raise ValueError(f"block ids are {_ID} bytes, got {len(block_id)}")
    if not 1 <= bits <= 24 or len(starts) != ((1 << bits) + 1) * 4:
        raise ValueError("starts do not match bits")
    b = int.from_bytes(block_id[:4], "big") >> (32 - bits)
    lo, hi = _U32_PAIR.unpack_from(starts, 4 * b)
    lo *= _TREC
    hi *= _TREC
    if hi > len(data):
        raise ValueError("starts do not match the records")
    return _find_key(data, block_id, lo, hi)


def _find_key(records: bytes, block_id: bytes, lo: int, hi: int) -> int:
    """Byte offset of the first 32-byte table record in records[lo:hi] whose key is block_id's
    first 16 bytes, or -1 (a table's bucket, or a bucket of the index file)."""
    key = block_id[:_KEY]
    pos = records.find(key, lo, hi)
    while pos >= 0 and (pos - lo) % _TREC:  # a match across fields or records is not a key
        pos = records.find(key, pos + 1, hi)
    return pos


# ==========================================================================================
# -- the read path (verify, restore): located blocks and whole ranged reads of a pack -------
# Twins of the native section of the same name. A located block is a 48-byte REF record, the
# index's own in-memory record: id [32] | offset u64 | stored length u32 | pack number u32
# (little-endian), with stored length 0 for a block the index lacks.
# ==========================================================================================

_REF = struct.Struct("<32sQII")

# Fault messages of open_blocks by status: FAULT_MESSAGES, from pgvault/_faults.py (the native
# module reads them there without importing this module).
(_BEYOND, _SHORT, _MAGIC, _VERSION, _KIND, _ENC_PLAIN_REPO, _PLAIN_ENC_REPO, _CHECKSUM, _AUTH, _KEY_ID,
 _CODEC, _DECOMPRESS, _LENGTH, _FRAME, _NO_DICT) = range(1, 16)


class _Fault(Exception):
    def __init__(self, status: int, param: int = 0) -> None:
        super().__init__(status, param)
        self.status = status
        self.param = param


def index_locate(data: bytes, starts: bytes, bits: int, ids: bytes | memoryview, out: bytearray) -> int:
    """Look up many ids in one table (by their first 16 bytes, as index_find): out holds one
    48-byte REF record per 32-byte id of ids;
    records whose stored length is still 0 are looked up, and set to the table's record when
    found, else to the id with offset, length and pack number 0. Returns how many were found."""
    if not 1 <= bits <= 24 or len(starts) != ((1 << bits) + 1) * 4:
        raise ValueError("starts do not match bits")
    if array("I", starts[-4:])[0] * _TREC != len(data):
        raise ValueError("starts do not match the records")
    ids = _byte_view(ids)
    if len(ids) % _ID or len(out) != len(ids) // _ID * _RECORD:
        raise ValueError("out must hold one 48-byte record per 32-byte id")
    found = 0
    for k in range(len(ids) // _ID):
        rec = k * _RECORD
        if out[rec + 40 : rec + 44] != b"\0\0\0\0":
            continue
        block_id = bytes(ids[k * _ID : k * _ID + _ID])
        pos = index_find(data, starts, bits, block_id)
        if pos >= 0:
            out[rec : rec + _RECORD] = block_id + data[pos + _KEY : pos + _TREC]
            found += 1
        else:
            out[rec : rec + _RECORD] = block_id + bytes(_RECORD - _ID)
    return found


def refs_sort(refs: bytes | bytearray | memoryview) -> bytes:
    """REF records sorted by (pack number, offset, length, id), exact duplicates dropped."""
    view = _byte_view(refs)
    if len(view) % _RECORD:
        raise ValueError("REF records are 48 bytes")
    unique = {bytes(view[i : i + _RECORD]) for i in range(0, len(view), _RECORD)}

    def key(rec: bytes) -> tuple[int, int, int, bytes]:
        block_id, offset, length, pno = _REF.unpack(rec)
        return pno, offset, length, block_id

    return b"".join(sorted(unique, key=key))


def refs_runs(
    refs: bytes | bytearray | memoryview, first: int, count: int, max_bytes: int, max_gap: int, max_blocks: int
) -> list[tuple[int, int]]:
    """Cut REF records first..first+count-1 into runs (start, end) of records that one ranged
    read serves: same pack, each beginning at most max_gap bytes after the previous one ends
    (never before it), spanning at most max_bytes (a longer single block is a run alone) and at
    most max_blocks records."""
    if max_blocks < 1:
        raise ValueError("max_blocks must be positive")
    view = _byte_view(refs)
    if len(view) % _RECORD or first < 0 or count < 0 or first + count > len(view) // _RECORD:
        raise ValueError("records out of range")
    runs: list[tuple[int, int]] = []
    start = first
    run_off = end = pno = 0
    for k in range(first, first + count):
        _, off, length, rec_pno = _REF.unpack_from(view, k * _RECORD)
        if k > start and (rec_pno != pno or off < end or off - end > max_gap
                          or off + length - run_off > max_bytes or k - start >= max_blocks):
            runs.append((start, k))
            start = k
        if k == start:
            run_off, pno, end = off, rec_pno, off + length
        else:
            end = max(end, off + length)
    if count:
        runs.append((start, first + count))
    return runs


def entries_refs(body: bytes | bytearray | memoryview, pack_number: int) -> bytes:
    """An index object's ENTRY records (44 bytes: id, offset, stored length) as REF records of
    pack number pack_number, in the same order: what verify checks a whole pack with."""
    view = _byte_view(body)
    entry = _RECORD - 4
    if len(view) % entry:
        raise ValueError("ENTRY records are 44 bytes")
    if not 0 <= pack_number <= 0xFFFFFFFF:
        raise OverflowError("pack number out of range")
    count = len(view) // entry
    out = bytearray(count * _RECORD)
    for column in range(entry):  # one strided copy per byte column, not a loop per record
        out[column::_RECORD] = view[column::entry].tobytes()
    for column, byte in enumerate(pack_number.to_bytes(4, "little")):
        out[entry + column :: _RECORD] = bytes([byte]) * count
    return bytes(out)


def open_blocks(
    data: bytes | bytearray | memoryview,
    data_offset: int,
    refs: bytes | bytearray | memoryview,
    first: int,
    count: int,
    key: bytes | None,
    kind: int,
    dicts: object,
    decompress: bool,
) -> tuple[bytes | None, bytes | None, list[tuple[int, str]]]:
    """Authenticate (and with decompress, open) the sealed objects REF records first..first+count-1
    locate in data, a ranged read of their pack starting at pack offset data_offset; each
    object's context is its record's id. key: the data key, or None (unencrypted repository).
    dicts: finds a ZSTD_DICT object's dictionary by id (codecs.Dictionaries) or None.

    Returns (out, spans, faults): out, with decompress, the plaintexts one after another (an
    object that fails to decompress leaves its raw length of zeros), else None; spans, with
    decompress, count u64 lengths of each object's part of out (0 when it failed
    authentication), else None; faults, [(record number, message)] in record order."""
    import zstandard

    from pgvault.errors import IntegrityError

    view = _byte_view(data)
    recs = _byte_view(refs)
    if len(recs) % _RECORD or first < 0 or count < 0 or first + count > len(recs) // _RECORD:
        raise ValueError("records out of range")
    if key is not None and len(key) != 32:
        raise ValueError("the data key is 32 bytes")
    parts: list[bytes] = []
    spans = array("Q")
    faults: list[tuple[int, str]] = []
    dict_errors: dict[int, str] = {}
    for k in range(first, first + count):
        block_id, off, length, _ = _REF.unpack_from(recs, k * _RECORD)
        raw_length = 0
        try:
            if off < data_offset or off - data_offset + length > len(view):
                raise _Fault(_BEYOND)
            sealed = view[off - data_offset : off - data_offset + length]
            codec, payload, raw_length = _authenticate(sealed, block_id, kind, key)
            if decompress:
                parts.append(_decompress(codec, payload, raw_length, dicts, dict_errors, zstandard, IntegrityError))
                spans.append(raw_length)
        except _Fault as fault:
            faults.append((k, FAULT_MESSAGES[fault.status].format(fault.param, kind)))
            if decompress:
                span = raw_length if fault.status in (_CODEC, _DECOMPRESS, _LENGTH, _FRAME, _NO_DICT) else 0
                parts.append(bytes(span))
                spans.append(span)
        except _DictError as exc:
            faults.append((k, str(exc)))
            parts.append(bytes(raw_length))
            spans.append(raw_length)
    if not decompress:
        return None, None, faults
    return b"".join(parts), spans.tobytes(), faults


class _DictError(Exception):
    """A dictionary lookup failed; the message is the IntegrityError's."""


def _authenticate(sealed: memoryview, context: bytes, kind: int, key: bytes | None) -> tuple[int, bytes, int]:
    import xxhash
    from nacl import bindings, exceptions

    if len(sealed) < 16:
        raise _Fault(_SHORT)
    magic, version, obj_kind, codec, key_id, raw_length = struct.unpack_from("<4sBBBBQ", sealed)
    if magic != b"PGVO":
        raise _Fault(_MAGIC)
    if version != 1:
        raise _Fault(_VERSION, version)
    if kind >= 0 and obj_kind != kind:
        raise _Fault(_KIND, obj_kind)
    header = bytes(sealed[:16])
    body = bytes(sealed[16:])
    if key_id == 1:
        if key is None:
            raise _Fault(_ENC_PLAIN_REPO)
        if len(body) < 24 + 16:
            raise _Fault(_AUTH)
        try:
            payload = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(body[24:], header + context, body[:24], key)
        except exceptions.CryptoError:
            raise _Fault(_AUTH) from None
    elif key_id == 0:
        if key is not None:
            raise _Fault(_PLAIN_ENC_REPO)
        if len(body) < 16 or xxhash.xxh3_128_digest(header + context + body[:-16]) != body[-16:]:
            raise _Fault(_CHECKSUM)
        payload = body[:-16]
    else:
        raise _Fault(_KEY_ID, key_id)
    return codec, payload, raw_length


def _decompress(
    codec: int, payload: bytes, raw_length: int, dicts: object, dict_errors: dict[int, str],
    zstandard: object, integrity_error: type[Exception],
) -> bytes:
    import lz4.block

    zstd = zstandard
    if codec == 0:
        if len(payload) != raw_length:
            raise _Fault(_LENGTH)
        return payload
    if codec in (1, 3):
        zdict = None
        if codec == 3:
            try:
                dict_id = zstd.get_frame_parameters(payload).dict_id  # type: ignore[attr-defined]
            except zstd.ZstdError:  # type: ignore[attr-defined]
                raise _Fault(_FRAME) from None
            if not dict_id:
                raise _Fault(_NO_DICT, 0)
            if dict_id not in dict_errors:
                try:
                    if dicts is None:
                        raise integrity_error(FAULT_MESSAGES[_NO_DICT].format(dict_id))
                    zdict = dicts(dict_id)  # type: ignore[operator]
                except integrity_error as exc:
                    dict_errors[dict_id] = str(exc)
            if dict_id in dict_errors:
                raise _DictError(dict_errors[dict_id])
        try:
            params = zstd.get_frame_parameters(payload)  # type: ignore[attr-defined]
        except zstd.ZstdError:  # type: ignore[attr-defined]
            raise _Fault(_DECOMPRESS) from None
        if params.content_size not in (zstd.CONTENTSIZE_UNKNOWN, raw_length):  # type: ignore[attr-defined]
            raise _Fault(_LENGTH)
        dec = zstd.ZstdDecompressor() if zdict is None else zstd.ZstdDecompressor(dict_data=zdict)  # type: ignore[attr-defined]
        try:
            out = dec.decompress(payload, max_output_size=raw_length)
        except zstd.ZstdError:  # type: ignore[attr-defined]
            raise _Fault(_DECOMPRESS) from None
    elif codec == 2:
        try:
            out = lz4.block.decompress(payload, uncompressed_size=raw_length)
        except lz4.block.LZ4BlockError:
            raise _Fault(_DECOMPRESS) from None
    else:
        raise _Fault(_CODEC, codec)
    if len(out) != raw_length:
        raise _Fault(_LENGTH)
    return out


def writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a just-written range of a file to disk without waiting for it
    (sync_file_range(SYNC_FILE_RANGE_WRITE)), so the fsync at the file's end finds most of it
    already written. Only a hint: errors are left for that fsync to report."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


@lru_cache(maxsize=1)
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn  # type: ignore[no-any-return]


# ==========================================================================================
# -- bounded index tables (branch memflat): twin of the native section of the same name ----
# ==========================================================================================


def index_find_any(tables: Sequence[tuple[bytes, bytes, int]], block_id: bytes) -> int:
    """The position in tables (a sequence of (data, starts, bits) as index_find takes them) of
    the first table holding block_id, or -1."""
    if len(block_id) != _ID:
        raise ValueError(f"block ids are {_ID} bytes, got {len(block_id)}")
    for k, (data, starts, bits) in enumerate(tables):
        if index_find(data, starts, bits, block_id) >= 0:
            return k
    return -1


# ==========================================================================================
# The write path (backup): sealing a chunk's new blocks (repository/blockstore.py).
# ==========================================================================================

_PAGE_BOUNDS = struct.Struct("<HHH")  # pd_lower, pd_upper, pd_special at offset 12


def _page_class(block: memoryview) -> int:
    """1 for a PostgreSQL page with special space (blockstore.page_class "s"), else 0."""
    if len(block) < BLCKSZ:
        return 0
    lower, upper, special = _PAGE_BOUNDS.unpack_from(block, 12)
    return 1 if 24 <= lower <= upper <= special < BLCKSZ else 0


def seal_blocks(
    data: Buffer,
    block_size: int,
    ids: Buffer,
    members: list[int],
    kind: int,
    codec: int,
    level: int,
    zdicts: tuple[object, object],
    key: bytes | None,
) -> tuple[bytes, bytes, bytes]:
    """Seal blocks of data (block i is data[i*block_size:(i+1)*block_size], the last may be
    short) for the indices in members, each with its 32-byte context ids[32*i:32*i+32],
    as envelope.seal would: compressed with codec (0 none, 1 zstd, 2 lz4; 3 is taken as 1) at
    level, zstd blocks with zdicts[page class] when that is not None (codec 3 then), stored
    when compression does not make a block smaller; key: the data key, or None (unencrypted
    repository: xxh3-128 checksum).

    Returns (out, ends, classes): out, the sealed objects one after another; ends, one u64
    per member, the end of its object in out; classes, one byte per member, 1 for a page
    with special space (blockstore.page_class "s"), else 0. Each object is envelope.seal's."""
    from pgvault.pipeline import codecs, envelope
    from pgvault.pipeline.crypto import Keys

    codec = 1 if codec == 3 else codec
    if codec not in (0, 1, 2):
        raise ValueError(f"unknown codec id {codec}")
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    view = _byte_view(data)
    contexts = _byte_view(ids)
    nblocks = -(-len(view) // block_size)
    if len(contexts) != nblocks * 32:
        raise ValueError("ids must hold 32 bytes for each block of data")
    if key is not None and len(key) != 32:
        raise ValueError("the data key is 32 bytes")
    keys = Keys(key, bytes(32))  # the id key is not used: the contexts are given
    parts: list[bytes] = []
    ends = array("Q")
    classes = bytearray()
    total = 0
    for i in members:
        if i < 0 or i >= nblocks:
            raise ValueError(f"block {i} is beyond the data")
        block = view[i * block_size : (i + 1) * block_size]
        cls = _page_class(block)
        context = bytes(contexts[i * 32 : (i + 1) * 32])
        sealed = envelope.seal(keys, envelope.Kind(kind), block, context, codecs.Codec(codec), level, zdicts[cls])  # type: ignore[arg-type]
        parts.append(sealed)
        total += len(sealed)
        ends.append(total)
        classes.append(cls)
    return b"".join(parts), ends.tobytes(), bytes(classes)


def block_ids(data: Buffer, block_size: int, key: bytes) -> bytes:
    """Content ids (keyed BLAKE3, as crypto.Keys.block_id) of each block_size piece of data,
    the last may be short: 32 bytes each, concatenated."""
    from blake3 import blake3

    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if len(key) != 32:
        raise ValueError("the id key is 32 bytes")
    view = _byte_view(data)
    return b"".join(blake3(view[pos : pos + block_size], key=key).digest() for pos in range(0, len(view), block_size))


# ==========================================================================================
# The index on disk (repository/diskindex.py): a file of 2**bits buckets of BUCKET bytes, each
# a header (u32 record count, u32 flags, 24 zero bytes) and up to SLOTS 32-byte table records.
# A record's home bucket is the top `bits` bits of its id's first 4 bytes (big-endian), as for
# the in-memory tables. A record whose home is full goes to the next bucket with room (linear
# probing, wrapping at the end), and every full bucket it passes is flagged OVERFLOW, so a
# lookup goes on past a bucket only while that bucket is flagged.
# ==========================================================================================

_BUCKET = 4096
_SLOTS = (_BUCKET - _TREC) // _TREC  # 127
_OVERFLOW = 1
_BUCKET_HEAD = struct.Struct("<II")
_HOME = struct.Struct(">I")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be in 1..24, got {bits}")


def bucket_fill(region: bytearray, first: int, bits: int, records: Buffer, carry: bool) -> bytes:
    """Place 32-byte table records into region, whole buckets first.. of a file of 2**bits
    buckets. Each record goes to the first bucket from its home on with room (with carry: from
    the region's first bucket on, for records that ran past the end of the region before),
    flagging every full bucket it passes. Returns the records that ran past the region's end,
    in order (the caller places them from the next bucket on). Without carry, every record's
    home must be in the region."""
    _check_bits(bits)
    if len(region) % _BUCKET:
        raise ValueError(f"a region is whole {_BUCKET}-byte buckets")
    count = len(region) // _BUCKET
    if first < 0 or first + count > 1 << bits:
        raise ValueError("the region is outside the file")
    view = _byte_view(records)
    if len(view) % _TREC:
        raise ValueError("table records are 32 bytes")
    shift = 32 - bits
    rest = []
    for pos in range(0, len(view), _TREC):
        b = 0 if carry else (_HOME.unpack_from(view, pos)[0] >> shift) - first
        if not 0 <= b < count:
            raise ValueError("a record's home bucket is outside the region")
        while b < count:
            head = b * _BUCKET
            used, flags = _BUCKET_HEAD.unpack_from(region, head)
            if used > _SLOTS:
                raise ValueError(f"bucket {first + b} claims {used} records")
            if used < _SLOTS:
                dst = head + _TREC + used * _TREC
                region[dst : dst + _TREC] = view[pos : pos + _TREC]
                _BUCKET_HEAD.pack_into(region, head, used + 1, flags)
                break
            _BUCKET_HEAD.pack_into(region, head, used, flags | _OVERFLOW)
            b += 1
        else:
            rest.append(bytes(view[pos : pos + _TREC]))
    return b"".join(rest)


def bucket_records(region: Buffer) -> bytes:
    """The records of whole buckets, bucket by bucket."""
    view = _byte_view(region)
    if len(view) % _BUCKET:
        raise ValueError(f"a region is whole {_BUCKET}-byte buckets")
    parts = []
    for head in range(0, len(view), _BUCKET):
        (used,) = struct.unpack_from("<I", view, head)
        if used > _SLOTS:
            raise ValueError(f"bucket {head // _BUCKET} claims {used} records")
        parts.append(view[head + _TREC : head + _TREC + used * _TREC])
    return b"".join(parts)


def disk_locate(fd: int, bits: int, ids: Buffer, out: bytearray) -> int:
    """index_locate against the index file open at fd (2**bits buckets): records of out whose
    stored length is still 0 are looked up and set to the file's record when found, else to
    the id with offset, length and pack number 0. One pread of a bucket per lookup (more only
    past flagged buckets). Returns how many were found; OSError when the file cannot be read."""
    import os

    _check_bits(bits)
    ids = _byte_view(ids)
    if len(ids) % _ID or len(out) != len(ids) // _ID * _RECORD:
        raise ValueError("out must hold one 48-byte record per 32-byte id")
    count = 1 << bits
    shift = 32 - bits
    found = 0
    for k in range(len(ids) // _ID):
        rec = k * _RECORD
        if out[rec + 40 : rec + 44] != b"\0\0\0\0":
            continue
        block_id = bytes(ids[k * _ID : k * _ID + _ID])
        out[rec : rec + _RECORD] = block_id + bytes(_RECORD - _ID)
        b = _HOME.unpack_from(block_id)[0] >> shift
        for _ in range(count):
            bucket = os.pread(fd, _BUCKET, b * _BUCKET)
            if len(bucket) != _BUCKET:
                raise OSError(f"index file: short read of bucket {b}")
            used, flags = _BUCKET_HEAD.unpack_from(bucket)
            if used > _SLOTS:
                raise ValueError(f"bucket {b} claims {used} records")
            pos = _find_key(bucket, block_id, _TREC, _TREC + used * _TREC)
            if pos >= 0:
                out[rec + _ID : rec + _RECORD] = bucket[pos + _KEY : pos + _TREC]
                found += 1
                break
            if not flags & _OVERFLOW:
                break
            b = (b + 1) % count
    return found
