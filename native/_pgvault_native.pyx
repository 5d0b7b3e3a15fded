# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Native hot loops for pgvault (built as ``pgvault._native``; see native/build.md).

Same interface and error behaviour as ``pgvault/_pure.py``; ``pgvault._accel`` picks one.

* ``checksum_page(page, blkno)``  -- PostgreSQL's ``pg_checksum_page`` for one 8192-byte page.
* ``verify_pages(buf, first_blkno)`` -- block numbers of pages whose stored pd_checksum is wrong.
  ``first_blkno`` is the block number *within the whole relation* of the first page of ``buf``:
  for segment file ``<relfilenode>.<segno>`` at byte offset ``off`` that is
  ``segno * 131072 + off // 8192`` (RELSEG_SIZE = 131072 blocks of 8192 bytes = 1 GiB).
* ``block_digests(buf, block_size)`` -- concatenated xxh3-128 digests of ``block_size`` pieces.
* ``changed_blocks(new_digests, old_digests, width=16)`` -- indices of digests that differ.

Pages are read as native-endian uint32 words, exactly like the server does, so the
checksums are those of a cluster written by a server on a host of the same byte order.
``verify_pages`` runs its checksum loop without the GIL.
"""

from cpython.buffer cimport PyBUF_READ, PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.stdint cimport uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from operator import index as _index

import sys as _sys

import xxhash as _xxhash

IMPL = "native"

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* A transcription of src/include/storage/checksum_impl.h (PostgreSQL, BLCKSZ 8192). */
    #define PGV_BLCKSZ 8192
    #define PGV_N_SUMS 32
    #define PGV_ROWS (PGV_BLCKSZ / (4 * PGV_N_SUMS))
    #define PGV_FNV_PRIME 16777619u

    static const uint32_t pgv_checksum_base_offsets[PGV_N_SUMS] = {
        0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A,
        0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
        0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA,
        0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
        0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE,
        0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
        0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
        0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756
    };

    #define PGV_CHECKSUM_COMP(checksum, value) do { \\
        uint32_t pgv_tmp_ = (checksum) ^ (value); \\
        (checksum) = pgv_tmp_ * PGV_FNV_PRIME ^ (pgv_tmp_ >> 17); \\
    } while (0)

    /*
     * pg_checksum_block with pd_checksum (bytes 8-9) read as zero. The page is never
     * written (it may be an immutable bytes object shared with other threads) and may be
     * unaligned: each 128-byte row is memcpy'd into an aligned local array, which the
     * compiler turns into plain vector loads. The fixed 32-wide inner loop is what
     * gcc/clang auto-vectorize at -O3 (-O2 on gcc >= 12).
     */
    static uint32_t pgv_checksum_block(const unsigned char *page)
    {
        uint32_t sums[PGV_N_SUMS];
        uint32_t row[PGV_N_SUMS];
        uint32_t result = 0;
        int i, j;

        memcpy(sums, pgv_checksum_base_offsets, sizeof(sums));

        memcpy(row, page, sizeof(row));
        memset((unsigned char *) row + 8, 0, 2);          /* pd_checksum */
        for (j = 0; j < PGV_N_SUMS; j++)
            PGV_CHECKSUM_COMP(sums[j], row[j]);

        for (i = 1; i < PGV_ROWS; i++)
        {
            memcpy(row, page + (size_t) i * sizeof(row), sizeof(row));
            for (j = 0; j < PGV_N_SUMS; j++)
                PGV_CHECKSUM_COMP(sums[j], row[j]);
        }

        for (i = 0; i < 2; i++)
            for (j = 0; j < PGV_N_SUMS; j++)
                PGV_CHECKSUM_COMP(sums[j], 0);

        for (j = 0; j < PGV_N_SUMS; j++)
            result ^= sums[j];
        return result;
    }

    static uint32_t pgv_checksum_page(const unsigned char *page, uint32_t blkno)
    {
        uint32_t checksum = pgv_checksum_block(page) ^ blkno;
        return (uint16_t) ((checksum % 65535) + 1);
    }

    static uint16_t pgv_read_u16(const unsigned char *p)
    {
        uint16_t v;
        memcpy(&v, p, sizeof(v));
        return v;
    }

    /*
     * Sets bad[i] = 1 for every page i (of npages) that is not new (pd_upper != 0) and whose
     * stored pd_checksum differs from the computed one, else 0. Returns the count of bad pages.
     * Block number arithmetic is modulo 2**32; the caller guarantees it does not wrap.
     */
    static Py_ssize_t pgv_verify_pages(const unsigned char *buf, Py_ssize_t npages,
                                       uint32_t first_blkno, unsigned char *bad)
    {
        Py_ssize_t i, nbad = 0;

        for (i = 0; i < npages; i++)
        {
            const unsigned char *page = buf + (size_t) i * PGV_BLCKSZ;

            bad[i] = 0;
            if (pgv_read_u16(page + 14) == 0)               /* PageIsNew: pd_upper == 0 */
                continue;
            if (pgv_read_u16(page + 8) != pgv_checksum_page(page, first_blkno + (uint32_t) i))
            {
                bad[i] = 1;
                nbad++;
            }
        }
        return nbad;
    }
    """
    uint32_t pgv_checksum_page(const unsigned char *page, uint32_t blkno) nogil
    Py_ssize_t pgv_verify_pages(const unsigned char *buf, Py_ssize_t npages,
                                uint32_t first_blkno, unsigned char *bad) nogil


cdef enum:
    BLCKSZ = 8192
    DIGEST_SIZE = 16

cdef object MAX_BLKNO = 0xFFFFFFFF          # BlockNumber is uint32
cdef object PY_SSIZE_T_MAX = _sys.maxsize

# Looked up once; a C-level reference avoids a module dict lookup per block.
cdef object _xxh3_128_digest = _xxhash.xxh3_128_digest


cdef inline int _get_buffer(object obj, Py_buffer *view) except -1:
    # PyBUF_SIMPLE: any C-contiguous buffer (bytes, bytearray, memoryview, mmap, array...),
    # read-only is fine; len is in bytes whatever the item format. Non-contiguous -> BufferError.
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    return 0


cdef uint32_t _check_blkno(object blkno, Py_ssize_t npages, str name) except? 0xFFFFFFFF:
    cdef object b = _index(blkno)
    cdef object last = b + (npages - 1 if npages > 0 else 0)
    if b < 0 or last > MAX_BLKNO:
        if npages > 1:
            raise ValueError(
                f"{name}={b} with {npages} pages runs past the largest block number {MAX_BLKNO}")
        raise ValueError(f"{name} must be in 0..{MAX_BLKNO}, got {b}")
    return <uint32_t> b


cdef Py_ssize_t _check_positive(object value, str name) except -1:
    cdef object v = _index(value)
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    if v > PY_SSIZE_T_MAX:
        raise ValueError(f"{name} is too large: {v}")
    return <Py_ssize_t> v


def checksum_page(page, blkno) -> int:
    """PostgreSQL's pg_checksum_page(page, blkno): uint16 in 1..65535.

    ``page`` is any C-contiguous buffer of exactly 8192 bytes; its pd_checksum field
    (bytes 8-9) is treated as zero and is not modified. ``blkno`` is the block number within
    the relation (see ``verify_pages``), 0..2**32-1. Does not skip new pages.
    """
    cdef Py_buffer view
    cdef uint32_t b
    cdef uint32_t result
    _get_buffer(page, &view)
    try:
        if view.len != BLCKSZ:
            raise ValueError(f"a page is {BLCKSZ} bytes, got {view.len}")
        b = _check_blkno(blkno, 1, "blkno")
        # One page is ~1 us of work: too little to be worth handing the GIL over (a thread
        # that releases it may wait a whole switch interval, 5 ms, to get it back from a
        # thread running Python). So this one keeps it; verify_pages releases it.
        result = pgv_checksum_page(<const unsigned char *> view.buf, b)
    finally:
        PyBuffer_Release(&view)
    return result


def verify_pages(buf, first_blkno) -> list:
    """Absolute block numbers of the pages in ``buf`` that fail their checksum.

    ``buf`` is a C-contiguous buffer whose length is a multiple of 8192. Page i has block
    number ``first_blkno + i``, where ``first_blkno`` is the block number within the whole
    relation, not within the segment file: for segment ``<relfilenode>.<segno>`` read from
    byte offset ``off`` pass ``segno * 131072 + off // 8192`` (RELSEG_SIZE = 131072).
    New pages (pd_upper == 0, which includes all-zero pages) are skipped, as pg_checksums
    does. Runs without the GIL.
    """
    cdef Py_buffer view
    cdef Py_ssize_t npages, i, nbad = 0
    cdef uint32_t first
    cdef unsigned char *bad = NULL
    cdef list result = []
    _get_buffer(buf, &view)
    try:
        if view.len % BLCKSZ:
            raise ValueError(f"buffer length {view.len} is not a multiple of {BLCKSZ}")
        npages = view.len // BLCKSZ
        first = _check_blkno(first_blkno, npages, "first_blkno")
        if npages == 0:
            return result
        bad = <unsigned char *> malloc(<size_t> npages)
        if bad == NULL:
            raise MemoryError()
        with nogil:
            nbad = pgv_verify_pages(<const unsigned char *> view.buf, npages, first, bad)
        if nbad:
            for i in range(npages):
                if bad[i]:
                    result.append(<object> first + i)
    finally:
        free(bad)
        PyBuffer_Release(&view)
    return result


def block_digests(buf, block_size) -> bytes:
    """xxh3-128 digests (16 bytes each, canonical big-endian) of each ``block_size`` piece.

    The last piece may be short; an empty buffer gives ``b""``. Equal to
    ``b"".join(xxhash.xxh3_128_digest(piece) for piece in pieces)``.
    """
    cdef Py_buffer view
    cdef Py_ssize_t bs = _check_positive(block_size, "block_size")
    cdef Py_ssize_t n, i, start, length
    cdef char *base
    cdef char *out_p
    cdef bytes out
    cdef object d
    cdef object fn = _xxh3_128_digest
    _get_buffer(buf, &view)
    try:
        n = view.len // bs + (1 if view.len % bs else 0)
        out = PyBytes_FromStringAndSize(NULL, n * DIGEST_SIZE)
        out_p = PyBytes_AS_STRING(out)
        base = <char *> view.buf
        for i in range(n):
            start = i * bs
            length = view.len - start
            if length > bs:
                length = bs
            # A read-only memoryview straight over our exported buffer: no Python slicing,
            # no copy. xxhash only reads it during the call; we hold the export until the end.
            d = fn(PyMemoryView_FromMemory(base + start, length, PyBUF_READ))
            if type(d) is not bytes or PyBytes_GET_SIZE(d) != DIGEST_SIZE:
                raise RuntimeError("xxhash.xxh3_128_digest did not return 16 bytes")
            memcpy(out_p + i * DIGEST_SIZE, PyBytes_AS_STRING(d), DIGEST_SIZE)
    finally:
        PyBuffer_Release(&view)
    return out


def changed_blocks(new_digests, old_digests, width=16) -> list:
    """Indices i whose ``width``-byte digest in ``new_digests`` differs from the one in
    ``old_digests``, or that lie beyond the end of ``old_digests``.

    Both lengths must be multiples of ``width``.
    """
    cdef Py_buffer nv, ov
    cdef Py_ssize_t w = _check_positive(width, "width")
    cdef Py_ssize_t n_new, n_old, common, i
    cdef const char *np_
    cdef const char *op_
    cdef list result = []
    _get_buffer(new_digests, &nv)
    try:
        _get_buffer(old_digests, &ov)
        try:
            if nv.len % w:
                raise ValueError(f"new_digests length {nv.len} is not a multiple of width {w}")
            if ov.len % w:
                raise ValueError(f"old_digests length {ov.len} is not a multiple of width {w}")
            n_new = nv.len // w
            n_old = ov.len // w
            common = n_new if n_new < n_old else n_old
            np_ = <const char *> nv.buf
            op_ = <const char *> ov.buf
            # Whole-range fast path: identical prefixes (the common case) cost one memcmp.
            if common and memcmp(np_, op_, <size_t> (common * w)) != 0:
                for i in range(common):
                    if memcmp(np_ + i * w, op_ + i * w, <size_t> w) != 0:
                        result.append(i)
            if n_new > common:
                result.extend(range(common, n_new))
        finally:
            PyBuffer_Release(&ov)
    finally:
        PyBuffer_Release(&nv)
    return result


# -- the block index (pgvault/repository/index.py) ------------------------------------------
# A table is `data`: records of 48 bytes (a 32-byte block id first), grouped in 2**bits buckets
# by the id's leading bits, and `starts`: 2**bits + 1 native uint32 record numbers, bucket b
# being records starts[b] .. starts[b+1]-1.

cdef enum:
    RECORD_SIZE = 48
    ID_SIZE = 32


cdef inline uint32_t _prefix(const unsigned char *p) nogil:
    return (<uint32_t> p[0] << 24) | (<uint32_t> p[1] << 16) | (<uint32_t> p[2] << 8) | <uint32_t> p[3]


def index_build(sources, bits) -> tuple:
    """One table from sources, a list of (records, stride, tail): records of ``stride`` bytes
    (44 or 48) whose 48-byte form is the record followed by ``tail`` (48 - stride bytes).
    Returns (data, starts) as bytes."""
    cdef int nbits = _index(bits)
    if not 1 <= nbits <= 24:
        raise ValueError(f"bits must be in 1..24, got {nbits}")
    cdef int shift = 32 - nbits
    cdef Py_ssize_t nb = (<Py_ssize_t> 1) << nbits
    cdef Py_ssize_t total = 0, i, n, stride, b
    cdef Py_buffer view
    cdef const unsigned char *src
    cdef char *dst
    cdef const char *tail_p
    cdef uint32_t *counts
    cdef bytes starts, out, tail
    for body, stride_obj, tail in sources:
        stride = _index(stride_obj)
        if stride not in (44, 48) or len(tail) != RECORD_SIZE - stride:
            raise ValueError("stride must be 44 or 48, with a tail of 48 - stride bytes")
    counts = <uint32_t *> malloc((nb + 1) * sizeof(uint32_t))
    if counts == NULL:
        raise MemoryError()
    try:
        memset(counts, 0, (nb + 1) * sizeof(uint32_t))
        for body, stride_obj, tail in sources:
            stride = stride_obj
            _get_buffer(body, &view)
            try:
                if view.len % stride:
                    raise ValueError(f"records of {view.len} bytes are not a multiple of {stride}")
                n = view.len // stride
                src = <const unsigned char *> view.buf
                for i in range(n):
                    counts[(_prefix(src + i * stride) >> shift) + 1] += 1
                total += n
            finally:
                PyBuffer_Release(&view)
        for b in range(1, nb + 1):
            counts[b] += counts[b - 1]
        starts = PyBytes_FromStringAndSize(<char *> counts, (nb + 1) * sizeof(uint32_t))
        out = PyBytes_FromStringAndSize(NULL, total * RECORD_SIZE)
        dst = PyBytes_AS_STRING(out)
        for body, stride_obj, tail in sources:
            stride = stride_obj
            tail_p = PyBytes_AS_STRING(tail)
            _get_buffer(body, &view)
            try:
                n = view.len // stride
                src = <const unsigned char *> view.buf
                for i in range(n):
                    b = _prefix(src + i * stride) >> shift
                    memcpy(dst + <Py_ssize_t> counts[b] * RECORD_SIZE, src + i * stride, <size_t> stride)
                    memcpy(dst + <Py_ssize_t> counts[b] * RECORD_SIZE + stride, tail_p, <size_t> (RECORD_SIZE - stride))
                    counts[b] += 1
            finally:
                PyBuffer_Release(&view)
    finally:
        free(counts)
    return out, starts


def index_merge(bytes a, bytes a_starts, bytes b, bytes b_starts) -> tuple:
    """One table holding the records of two tables of the same width, bucket by bucket."""
    if len(a_starts) != len(b_starts) or len(a_starts) % 4 or len(a_starts) < 8:
        raise ValueError("tables of different widths")
    cdef Py_ssize_t nb = len(a_starts) // 4 - 1, k, la, lb, pos = 0
    cdef const uint32_t *sa = <const uint32_t *> PyBytes_AS_STRING(a_starts)
    cdef const uint32_t *sb = <const uint32_t *> PyBytes_AS_STRING(b_starts)
    if <Py_ssize_t> sa[nb] * RECORD_SIZE != len(a) or <Py_ssize_t> sb[nb] * RECORD_SIZE != len(b):
        raise ValueError("starts do not match the records")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, len(a) + len(b))
    cdef bytes starts = PyBytes_FromStringAndSize(NULL, len(a_starts))
    cdef char *o = PyBytes_AS_STRING(out)
    cdef uint32_t *so = <uint32_t *> PyBytes_AS_STRING(starts)
    cdef const char *pa = PyBytes_AS_STRING(a)
    cdef const char *pb = PyBytes_AS_STRING(b)
    for k in range(nb):
        so[k] = sa[k] + sb[k]
        la = (sa[k + 1] - sa[k]) * RECORD_SIZE
        lb = (sb[k + 1] - sb[k]) * RECORD_SIZE
        memcpy(o + pos, pa + <Py_ssize_t> sa[k] * RECORD_SIZE, <size_t> la)
        memcpy(o + pos + la, pb + <Py_ssize_t> sb[k] * RECORD_SIZE, <size_t> lb)
        pos += la + lb
    so[nb] = sa[nb] + sb[nb]
    return out, starts


def index_find(bytes data, bytes starts, int bits, bytes block_id) -> int:
    """Byte offset in data of the record of block_id, or -1."""
    if len(block_id) != ID_SIZE:
        raise ValueError(f"block ids are {ID_SIZE} bytes, got {len(block_id)}")
    if not 1 <= bits <= 24 or len(starts) != (((<Py_ssize_t> 1) << bits) + 1) * 4:
        raise ValueError("starts do not match bits")
    cdef const unsigned char *idp = <const unsigned char *> PyBytes_AS_STRING(block_id)
    cdef const uint32_t *s = <const uint32_t *> PyBytes_AS_STRING(starts)
    cdef const char *d = PyBytes_AS_STRING(data)
    cdef uint32_t b = _prefix(idp) >> (32 - bits)
    cdef Py_ssize_t r
    if <Py_ssize_t> s[b + 1] * RECORD_SIZE > len(data):
        raise ValueError("starts do not match the records")
    for r in range(s[b], s[b + 1]):
        if memcmp(d + r * RECORD_SIZE, idp, ID_SIZE) == 0:
            return r * RECORD_SIZE
    return -1
