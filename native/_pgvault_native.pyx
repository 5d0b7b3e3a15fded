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
# A table is `data`: records of 32 bytes (the block id's first 16 bytes, offset u64, stored
# length u32, pack number u32), grouped in 2**bits buckets by the id's leading bits, and
# `starts`: 2**bits + 1 native uint32 record numbers, bucket b being records starts[b] ..
# starts[b+1]-1. Lookups compare the 16-byte key; REF records (the read path) stay 48 bytes.

cdef enum:
    RECORD_SIZE = 48
    ID_SIZE = 32
    TABLE_RECORD = 32
    KEY_SIZE = 16
    ENTRY_SIZE = 44


cdef inline uint32_t _prefix(const unsigned char *p) nogil:
    return (<uint32_t> p[0] << 24) | (<uint32_t> p[1] << 16) | (<uint32_t> p[2] << 8) | <uint32_t> p[3]


cdef inline const char *_find_key(const char *records, Py_ssize_t count, const unsigned char *idp) noexcept nogil:
    """The first of count table records whose 16-byte key starts idp, or NULL (every lookup:
    a table's bucket, or a bucket of the index file)."""
    cdef Py_ssize_t r
    for r in range(count):
        if memcmp(records + r * TABLE_RECORD, idp, KEY_SIZE) == 0:
            return records + r * TABLE_RECORD
    return NULL


def index_build(sources, bits) -> tuple:
    """One table from sources, a list of (records, stride, tail): 44-byte index ENTRY records
    (id, offset, length) with a 4-byte tail (the pack number), or 32-byte table records with
    an empty tail. Returns (data, starts) as bytes."""
    cdef int nbits = _index(bits)
    if not 1 <= nbits <= 24:
        raise ValueError(f"bits must be in 1..24, got {nbits}")
    cdef int shift = 32 - nbits
    cdef Py_ssize_t nb = (<Py_ssize_t> 1) << nbits
    cdef Py_ssize_t total = 0, i, n, stride, b
    cdef Py_buffer view
    cdef const unsigned char *src
    cdef char *dst
    cdef char *rec
    cdef const char *tail_p
    cdef uint32_t *counts
    cdef bytes starts, out, tail
    for body, stride_obj, tail in sources:
        stride = _index(stride_obj)
        if not ((stride == ENTRY_SIZE and len(tail) == 4) or (stride == TABLE_RECORD and len(tail) == 0)):
            raise ValueError("records must be 44 bytes with a 4-byte tail, or 32 bytes with none")
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
        out = PyBytes_FromStringAndSize(NULL, total * TABLE_RECORD)
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
                    rec = dst + <Py_ssize_t> counts[b] * TABLE_RECORD
                    if stride == TABLE_RECORD:
                        memcpy(rec, src + i * stride, TABLE_RECORD)
                    else:
                        memcpy(rec, src + i * stride, KEY_SIZE)
                        memcpy(rec + KEY_SIZE, src + i * stride + ID_SIZE, 12)
                        memcpy(rec + KEY_SIZE + 12, tail_p, 4)
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
    if <Py_ssize_t> sa[nb] * TABLE_RECORD != len(a) or <Py_ssize_t> sb[nb] * TABLE_RECORD != len(b):
        raise ValueError("starts do not match the records")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, len(a) + len(b))
    cdef bytes starts = PyBytes_FromStringAndSize(NULL, len(a_starts))
    cdef char *o = PyBytes_AS_STRING(out)
    cdef uint32_t *so = <uint32_t *> PyBytes_AS_STRING(starts)
    cdef const char *pa = PyBytes_AS_STRING(a)
    cdef const char *pb = PyBytes_AS_STRING(b)
    for k in range(nb):
        so[k] = sa[k] + sb[k]
        la = (sa[k + 1] - sa[k]) * TABLE_RECORD
        lb = (sb[k + 1] - sb[k]) * TABLE_RECORD
        memcpy(o + pos, pa + <Py_ssize_t> sa[k] * TABLE_RECORD, <size_t> la)
        memcpy(o + pos + la, pb + <Py_ssize_t> sb[k] * TABLE_RECORD, <size_t> lb)
        pos += la + lb
    so[nb] = sa[nb] + sb[nb]
    return out, starts


def index_find(bytes data, bytes starts, int bits, bytes block_id) -> int:
    """Byte offset in data of the record of block_id (its first 16 bytes), or -1."""
    if len(block_id) != ID_SIZE:
        raise ValueError(f"block ids are {ID_SIZE} bytes, got {len(block_id)}")
    if not 1 <= bits <= 24 or len(starts) != (((<Py_ssize_t> 1) << bits) + 1) * 4:
        raise ValueError("starts do not match bits")
    cdef const unsigned char *idp = <const unsigned char *> PyBytes_AS_STRING(block_id)
    cdef const uint32_t *s = <const uint32_t *> PyBytes_AS_STRING(starts)
    cdef const char *d = PyBytes_AS_STRING(data)
    cdef uint32_t b = _prefix(idp) >> (32 - bits)
    if <Py_ssize_t> s[b + 1] * TABLE_RECORD > len(data):
        raise ValueError("starts do not match the records")
    cdef const char *hit = _find_key(d + s[b] * TABLE_RECORD, s[b + 1] - s[b], idp)
    return -1 if hit == NULL else hit - d


# ==========================================================================================
# -- the read path (verify, restore): located blocks and whole ranged reads of a pack -------
# Owned by the read path (pgvault/ops/verify.py, ops/restore.py, repository.read_file).
# Links libzstd, liblz4 and libsodium and uses xxhash.h inline (setup.py; the -dev packages
# come from scripts/setup.sh). Same results and fault messages as the twins in pgvault/_pure.py.
#
# A located block is a 48-byte REF record, the index's own in-memory record:
#     id [32] | offset in pack u64 | stored length u32 | pack number u32     (little-endian)
# with stored length 0 for a block the index lacks.
# ==========================================================================================

from cpython.buffer cimport PyBUF_WRITABLE
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport qsort

cdef extern from *:
    """
    #include <zstd.h>
    #include <lz4.h>
    #include <sodium.h>
    #define XXH_INLINE_ALL
    #include <xxhash.h>

    #define PGV_SCRATCH 4096  /* stored objects up to this size are hashed in one call */

    /* Status of one envelope, mapped to a message by _fault_message. */
    enum {
        PGV_OK = 0, PGV_BEYOND, PGV_SHORT, PGV_MAGIC, PGV_VERSION, PGV_KIND, PGV_ENC_PLAIN_REPO,
        PGV_PLAIN_ENC_REPO, PGV_CHECKSUM, PGV_AUTH, PGV_KEY_ID, PGV_CODEC, PGV_DECOMPRESS,
        PGV_LENGTH, PGV_FRAME, PGV_NO_DICT, PGV_DICT_ERROR
    };

    typedef struct {
        const unsigned char *payload;   /* compressed bytes (plain repo: in the data read) */
        uint64_t payload_len;
        uint64_t raw_len;
        uint64_t out_pos;
        int status;
        int codec;
        uint64_t param;                 /* the number a message names (version, kind, id) */
        void *ddict;
        unsigned char *plain;           /* encrypted: decrypted payload (malloc'd) */
    } pgv_env;

    static uint64_t pgv_le64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
    static uint32_t pgv_le32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

    /* Check one sealed object against its context (docs/FORMAT.md §2). key: the data key, or
       NULL in an unencrypted repository. Encrypted payloads are decrypted into e->plain. */
    static void pgv_authenticate(const unsigned char *s, uint64_t len, const unsigned char *ctx,
                                 int want_kind, const unsigned char *key, pgv_env *e)
    {
        int key_id;
        e->payload = NULL; e->payload_len = 0; e->raw_len = 0; e->plain = NULL; e->ddict = NULL;
        if (len < 16) { e->status = PGV_SHORT; return; }
        if (memcmp(s, "PGVO", 4) != 0) { e->status = PGV_MAGIC; return; }
        if (s[4] != 1) { e->status = PGV_VERSION; e->param = s[4]; return; }
        if (want_kind >= 0 && s[5] != want_kind) { e->status = PGV_KIND; e->param = s[5]; return; }
        e->codec = s[6];
        key_id = s[7];
        e->raw_len = pgv_le64(s + 8);
        if (key_id == 1) {
            unsigned char aad[16 + 32];
            unsigned long long mlen = 0;
            uint64_t blen = len - 16;
            if (key == NULL) { e->status = PGV_ENC_PLAIN_REPO; return; }
            if (blen < crypto_aead_xchacha20poly1305_ietf_NPUBBYTES + crypto_aead_xchacha20poly1305_ietf_ABYTES) {
                e->status = PGV_AUTH; return;
            }
            memcpy(aad, s, 16);
            memcpy(aad + 16, ctx, 32);
            e->plain = (unsigned char *) malloc(blen ? blen : 1);
            if (e->plain == NULL) { e->status = PGV_AUTH; return; }
            if (crypto_aead_xchacha20poly1305_ietf_decrypt(
                    e->plain, &mlen, NULL, s + 16 + 24, blen - 24, aad, sizeof(aad), s + 16, key) != 0) {
                free(e->plain); e->plain = NULL;
                e->status = PGV_AUTH; return;
            }
            e->payload = e->plain;
            e->payload_len = mlen;
        } else if (key_id == 0) {
            XXH128_canonical_t c;
            if (key != NULL) { e->status = PGV_PLAIN_ENC_REPO; return; }
            if (len - 16 < 16) { e->status = PGV_CHECKSUM; return; }
            if (len <= PGV_SCRATCH) {
                /* One-shot over a copy: a streaming state costs more than the copy of a block
                   (8 KiB blocks store ~400 bytes: 36 -> 20 ms for a scale-100 backup). */
                unsigned char scratch[PGV_SCRATCH + 32];
                memcpy(scratch, s, 16);
                memcpy(scratch + 16, ctx, 32);
                memcpy(scratch + 48, s + 16, len - 32);
                XXH128_canonicalFromHash(&c, XXH3_128bits(scratch, len + 16));
            } else {
                XXH3_state_t st;
                XXH3_128bits_reset(&st);
                XXH3_128bits_update(&st, s, 16);
                XXH3_128bits_update(&st, ctx, 32);
                XXH3_128bits_update(&st, s + 16, len - 32);
                XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
            }
            if (memcmp(c.digest, s + len - 16, 16) != 0) { e->status = PGV_CHECKSUM; return; }
            e->payload = s + 16;
            e->payload_len = len - 32;
        } else {
            e->status = PGV_KEY_ID; e->param = key_id; return;
        }
        e->status = PGV_OK;
    }

    /* A ZSTD_DICT payload: the dictionary id its frame header names, into e->param. */
    static void pgv_frame_dict(pgv_env *e)
    {
        if (ZSTD_getFrameContentSize(e->payload, e->payload_len) == ZSTD_CONTENTSIZE_ERROR) {
            e->status = PGV_FRAME; return;
        }
        e->param = ZSTD_getDictID_fromFrame(e->payload, e->payload_len);
        if (e->param == 0) e->status = PGV_NO_DICT;
    }

    /* Decompress an authenticated payload to dst (e->raw_len bytes). */
    static void pgv_decompress(ZSTD_DCtx *dctx, pgv_env *e, unsigned char *dst)
    {
        size_t r;
        int n;
        switch (e->codec) {
        case 0:
            if (e->payload_len != e->raw_len) { e->status = PGV_LENGTH; return; }
            memcpy(dst, e->payload, e->raw_len);
            return;
        case 1:
        case 3: {
            unsigned long long cs = ZSTD_getFrameContentSize(e->payload, e->payload_len);
            if (cs == ZSTD_CONTENTSIZE_ERROR) { e->status = PGV_DECOMPRESS; return; }
            if (cs != ZSTD_CONTENTSIZE_UNKNOWN && cs != e->raw_len) { e->status = PGV_LENGTH; return; }
            if (e->codec == 3)
                r = ZSTD_decompress_usingDDict(dctx, dst, e->raw_len, e->payload, e->payload_len,
                                               (const ZSTD_DDict *) e->ddict);
            else
                r = ZSTD_decompressDCtx(dctx, dst, e->raw_len, e->payload, e->payload_len);
            if (ZSTD_isError(r)) { e->status = PGV_DECOMPRESS; return; }
            if (r != e->raw_len) { e->status = PGV_LENGTH; return; }
            return;
        }
        case 2:
            if (e->payload_len > 0x7fffffff || e->raw_len > 0x7fffffff) { e->status = PGV_DECOMPRESS; return; }
            n = LZ4_decompress_safe((const char *) e->payload, (char *) dst, (int) e->payload_len, (int) e->raw_len);
            if (n < 0) { e->status = PGV_DECOMPRESS; return; }
            if ((uint64_t) n != e->raw_len) { e->status = PGV_LENGTH; return; }
            return;
        default:
            e->status = PGV_CODEC; e->param = e->codec; return;
        }
    }

    static int pgv_ref_cmp(const void *a, const void *b)
    {
        const unsigned char *x = (const unsigned char *) a, *y = (const unsigned char *) b;
        uint32_t px = pgv_le32(x + 44), py = pgv_le32(y + 44);
        uint64_t ox = pgv_le64(x + 32), oy = pgv_le64(y + 32);
        uint32_t lx = pgv_le32(x + 40), ly = pgv_le32(y + 40);
        if (px != py) return px < py ? -1 : 1;
        if (ox != oy) return ox < oy ? -1 : 1;
        if (lx != ly) return lx < ly ? -1 : 1;
        return memcmp(x, y, 32);
    }

    /* Sort n REF records (src) into dst by (pack number, offset, length, id): an LSD radix
       sort of 64-bit keys pack << 40 | offset (bytes where every key agrees are skipped), then
       records of equal keys (only in a damaged index) by the full comparison. Returns 0, or -1
       when a key does not fit (offset >= 2**40 or pack >= 2**24: the caller sorts otherwise)
       or memory is short. ~10x faster than qsort with a comparison callback. */
    typedef struct { uint64_t key; uint64_t idx; } pgv_kv;

    static int pgv_refs_radix(const unsigned char *src, size_t n, unsigned char *dst)
    {
        pgv_kv *a, *b, *t;
        size_t i, j, count[256];
        int shift;
        a = (pgv_kv *) malloc((n ? n : 1) * sizeof(pgv_kv));
        b = (pgv_kv *) malloc((n ? n : 1) * sizeof(pgv_kv));
        if (a == NULL || b == NULL) { free(a); free(b); return -1; }
        for (i = 0; i < n; i++) {
            uint64_t off = pgv_le64(src + i * 48 + 32);
            uint32_t pno = pgv_le32(src + i * 48 + 44);
            if (off >= ((uint64_t) 1 << 40) || pno >= ((uint32_t) 1 << 24)) { free(a); free(b); return -1; }
            a[i].key = ((uint64_t) pno << 40) | off;
            a[i].idx = i;
        }
        for (shift = 0; shift < 64; shift += 8) {
            size_t sum = 0;
            int skip = 0;
            memset(count, 0, sizeof(count));
            for (i = 0; i < n; i++) count[(a[i].key >> shift) & 255]++;
            for (j = 0; j < 256; j++) if (count[j] == n) skip = 1;
            if (skip) continue;
            for (j = 0; j < 256; j++) { size_t c = count[j]; count[j] = sum; sum += c; }
            for (i = 0; i < n; i++) b[count[(a[i].key >> shift) & 255]++] = a[i];
            t = a; a = b; b = t;
        }
        for (i = 0; i < n; i++) memcpy(dst + i * 48, src + a[i].idx * 48, 48);
        for (i = 0; i < n; i = j) {
            int in_order = 1;
            for (j = i + 1; j < n && a[j].key == a[i].key; j++)
                if (in_order && pgv_ref_cmp(dst + (j - 1) * 48, dst + j * 48) > 0) in_order = 0;
            if (!in_order) qsort(dst + i * 48, j - i, 48, pgv_ref_cmp);  /* duplicates: in order */
        }
        free(a); free(b);
        return 0;
    }

    static int pgv_sodium_ready(void) { return sodium_init() >= 0; }
    """
    enum:
        PGV_OK, PGV_BEYOND, PGV_SHORT, PGV_MAGIC, PGV_VERSION, PGV_KIND, PGV_ENC_PLAIN_REPO
        PGV_PLAIN_ENC_REPO, PGV_CHECKSUM, PGV_AUTH, PGV_KEY_ID, PGV_CODEC, PGV_DECOMPRESS
        PGV_LENGTH, PGV_FRAME, PGV_NO_DICT, PGV_DICT_ERROR
    ctypedef struct pgv_env:
        const unsigned char *payload
        uint64_t payload_len
        uint64_t raw_len
        uint64_t out_pos
        int status
        int codec
        uint64_t param
        void *ddict
        unsigned char *plain
    ctypedef struct ZSTD_DCtx:
        pass
    ctypedef struct ZSTD_DDict:
        pass
    ZSTD_DCtx *ZSTD_createDCtx() nogil
    size_t ZSTD_freeDCtx(ZSTD_DCtx *) nogil
    ZSTD_DDict *ZSTD_createDDict(const void *buf, size_t size) nogil
    size_t ZSTD_freeDDict(ZSTD_DDict *) nogil
    unsigned int ZSTD_getDictID_fromDDict(const ZSTD_DDict *) nogil
    uint64_t pgv_le64(const unsigned char *p) nogil
    uint32_t pgv_le32(const unsigned char *p) nogil
    void pgv_authenticate(const unsigned char *s, uint64_t len, const unsigned char *ctx,
                          int want_kind, const unsigned char *key, pgv_env *e) nogil
    void pgv_decompress(ZSTD_DCtx *dctx, pgv_env *e, unsigned char *dst) nogil
    void pgv_frame_dict(pgv_env *e) nogil
    int pgv_ref_cmp(const void *a, const void *b) nogil
    int pgv_refs_radix(const unsigned char *src, size_t n, unsigned char *dst) nogil
    int pgv_sodium_ready()

if not pgv_sodium_ready():
    raise ImportError("libsodium failed to initialise")

from pgvault.errors import IntegrityError as _IntegrityError

# Messages as pgvault.pipeline.envelope words them, plus those of whole-run reads (the pure
# twin, pgvault._pure.open_blocks, uses the same table, from pgvault/_faults.py).
from pgvault._faults import FAULT_MESSAGES as _MESSAGES


cdef str _fault_message(int status, uint64_t param, int kind):
    return _MESSAGES[status].format(param, kind)


cdef class _DecompressionDict:
    """A ZSTD_DDict made once from a repository dictionary and shared by every thread."""
    cdef ZSTD_DDict *ddict
    cdef object source  # the ZstdCompressionDict, kept alive so its id() is not reused

    def __dealloc__(self):
        if self.ddict != NULL:
            ZSTD_freeDDict(self.ddict)


# id(ZstdCompressionDict) -> _DecompressionDict; a repository caches its dictionaries for its
# whole life, and there are few (docs/FORMAT.md §4a), so entries are never dropped.
cdef dict _ddicts = {}


cdef _DecompressionDict _ddict_for(object zdict):
    cdef _DecompressionDict d = _ddicts.get(id(zdict))
    cdef bytes raw
    if d is not None and d.source is zdict:
        return d
    raw = zdict.as_bytes()
    d = _DecompressionDict()
    d.ddict = ZSTD_createDDict(PyBytes_AS_STRING(raw), <size_t> len(raw))
    if d.ddict == NULL:
        raise MemoryError()
    d.source = zdict
    _ddicts[id(zdict)] = d
    return d


def index_locate(bytes data, bytes starts, int bits, ids, out) -> int:
    """Look up many ids in one table (by their first 16 bytes, as index_find): out holds one
    48-byte REF record per 32-byte id of ids;
    records whose stored length is still 0 are looked up, and set to the table's record when
    found, else to the id with offset, length and pack number 0. Returns how many were found."""
    cdef Py_buffer iv, ov
    cdef Py_ssize_t n, k, found = 0
    cdef const unsigned char *idp
    cdef unsigned char *rec
    cdef const uint32_t *s
    cdef const char *d = PyBytes_AS_STRING(data)
    cdef const char *hit
    cdef uint32_t b
    if not 1 <= bits <= 24 or len(starts) != (((<Py_ssize_t> 1) << bits) + 1) * 4:
        raise ValueError("starts do not match bits")
    s = <const uint32_t *> PyBytes_AS_STRING(starts)
    if <Py_ssize_t> s[(<Py_ssize_t> 1) << bits] * TABLE_RECORD != len(data):
        raise ValueError("starts do not match the records")
    PyObject_GetBuffer(ids, &iv, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &ov, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if iv.len % ID_SIZE or ov.len != iv.len // ID_SIZE * RECORD_SIZE:
                raise ValueError("out must hold one 48-byte record per 32-byte id")
            n = iv.len // ID_SIZE
            with nogil:
                for k in range(n):
                    idp = <const unsigned char *> iv.buf + k * ID_SIZE
                    rec = <unsigned char *> ov.buf + k * RECORD_SIZE
                    if pgv_le32(rec + 40) != 0:
                        continue
                    b = _prefix(idp) >> (32 - bits)
                    memcpy(rec, idp, ID_SIZE)
                    memset(rec + ID_SIZE, 0, RECORD_SIZE - ID_SIZE)
                    hit = _find_key(d + s[b] * TABLE_RECORD, s[b + 1] - s[b], idp)
                    if hit != NULL:
                        memcpy(rec + ID_SIZE, hit + KEY_SIZE, TABLE_RECORD - KEY_SIZE)
                        found += 1
        finally:
            PyBuffer_Release(&ov)
    finally:
        PyBuffer_Release(&iv)
    return found


def refs_sort(refs) -> bytes:
    """REF records sorted by (pack number, offset, length, id), exact duplicates dropped."""
    cdef Py_buffer v
    cdef Py_ssize_t n, k, m = 0
    cdef bytes out
    cdef char *o
    cdef int done
    PyObject_GetBuffer(refs, &v, PyBUF_SIMPLE)
    try:
        if v.len % RECORD_SIZE:
            raise ValueError("REF records are 48 bytes")
        n = v.len // RECORD_SIZE
        out = PyBytes_FromStringAndSize(NULL, v.len)
        o = PyBytes_AS_STRING(out)
        with nogil:
            done = pgv_refs_radix(<const unsigned char *> v.buf, <size_t> n, <unsigned char *> o)
            if done != 0:
                memcpy(o, v.buf, <size_t> v.len)
                qsort(o, <size_t> n, RECORD_SIZE, pgv_ref_cmp)
    finally:
        PyBuffer_Release(&v)
    with nogil:
        for k in range(n):
            if m == 0 or memcmp(o + (m - 1) * RECORD_SIZE, o + k * RECORD_SIZE, RECORD_SIZE) != 0:
                if m != k:
                    memcpy(o + m * RECORD_SIZE, o + k * RECORD_SIZE, RECORD_SIZE)
                m += 1
    return out[: m * RECORD_SIZE] if m != n else out


def refs_runs(refs, Py_ssize_t first, Py_ssize_t count, uint64_t max_bytes, uint64_t max_gap,
              Py_ssize_t max_blocks) -> list:
    """Cut REF records first..first+count-1 into runs (start, end) of records that one ranged
    read serves: same pack, each beginning at most max_gap bytes after the previous one ends
    (never before it), spanning at most max_bytes (a longer single block is a run alone) and at
    most max_blocks records."""
    cdef Py_buffer v
    cdef list runs = []
    cdef Py_ssize_t k, start
    cdef const unsigned char *p
    cdef const unsigned char *rec
    cdef uint64_t run_off = 0, end = 0, off, ln
    cdef uint32_t pno = 0
    if max_blocks < 1:
        raise ValueError("max_blocks must be positive")
    PyObject_GetBuffer(refs, &v, PyBUF_SIMPLE)
    try:
        if v.len % RECORD_SIZE or first < 0 or count < 0 or first + count > v.len // RECORD_SIZE:
            raise ValueError("records out of range")
        p = <const unsigned char *> v.buf
        start = first
        for k in range(first, first + count):
            rec = p + k * RECORD_SIZE
            off = pgv_le64(rec + 32)
            ln = pgv_le32(rec + 40)
            if k > start and (pgv_le32(rec + 44) != pno or off < end or off - end > max_gap
                              or off + ln - run_off > max_bytes or k - start >= max_blocks):
                runs.append((start, k))
                start = k
            if k == start:
                run_off = off
                pno = pgv_le32(rec + 44)
                end = off + ln
            elif off + ln > end:
                end = off + ln
        if count:
            runs.append((start, first + count))
    finally:
        PyBuffer_Release(&v)
    return runs


def entries_refs(body, uint32_t pack_number) -> bytes:
    """An index object's ENTRY records (44 bytes: id, offset, stored length) as REF records of
    pack number pack_number, in the same order: what verify checks a whole pack with."""
    cdef Py_buffer v
    cdef Py_ssize_t n, k
    cdef bytes out
    cdef unsigned char *o
    cdef const unsigned char *p
    PyObject_GetBuffer(body, &v, PyBUF_SIMPLE)
    try:
        if v.len % (RECORD_SIZE - 4):
            raise ValueError("ENTRY records are 44 bytes")
        n = v.len // (RECORD_SIZE - 4)
        out = PyBytes_FromStringAndSize(NULL, n * RECORD_SIZE)
        o = <unsigned char *> PyBytes_AS_STRING(out)
        p = <const unsigned char *> v.buf
        with nogil:
            for k in range(n):
                memcpy(o + k * RECORD_SIZE, p + k * (RECORD_SIZE - 4), RECORD_SIZE - 4)
                o[k * RECORD_SIZE + 44] = pack_number & 0xFF
                o[k * RECORD_SIZE + 45] = (pack_number >> 8) & 0xFF
                o[k * RECORD_SIZE + 46] = (pack_number >> 16) & 0xFF
                o[k * RECORD_SIZE + 47] = (pack_number >> 24) & 0xFF
    finally:
        PyBuffer_Release(&v)
    return out


cdef const unsigned char *_data_key(object key, Py_buffer *kv) except NULL:
    """The 32-byte data key's bytes, its buffer held in kv (the caller releases it)."""
    PyObject_GetBuffer(key, kv, PyBUF_SIMPLE)
    if kv.len != 32:
        PyBuffer_Release(kv)
        raise ValueError("the data key is 32 bytes")
    return <const unsigned char *> kv.buf


def open_blocks(data, uint64_t data_offset, refs, Py_ssize_t first, Py_ssize_t count, key,
                int kind, dicts, bint decompress) -> tuple:
    """Authenticate (and with decompress, open) the sealed objects REF records first..first+count-1
    locate in data, a ranged read of their pack starting at pack offset data_offset; each
    object's context is its record's id. key: the data key, or None (unencrypted repository).
    dicts: finds a ZSTD_DICT object's dictionary by id (codecs.Dictionaries) or None.

    Returns (out, spans, faults): out, with decompress, the plaintexts one after another (an
    object that fails to decompress leaves its raw length of zeros), else None; spans, with
    decompress, count u64 lengths of each object's part of out (0 when it failed
    authentication), else None; faults, [(record number, message)] in record order. Runs
    without the GIL except to look up a dictionary."""
    cdef Py_buffer dv, rv
    cdef Py_buffer kv
    cdef const unsigned char *keyp = NULL
    cdef pgv_env *envs = NULL
    cdef pgv_env *e
    cdef Py_ssize_t k
    cdef const unsigned char *rec
    cdef uint64_t off, ln, total = 0
    cdef ZSTD_DCtx *dctx = NULL
    cdef bytes out = None
    cdef bytes spans = None
    cdef unsigned char *o = NULL
    cdef uint64_t *sp = NULL
    cdef list faults = []
    cdef dict found
    cdef _DecompressionDict dd
    cdef int have_key = key is not None
    cdef dict dict_errors = {}
    if have_key:
        keyp = _data_key(key, &kv)
    PyObject_GetBuffer(data, &dv, PyBUF_SIMPLE)
    PyObject_GetBuffer(refs, &rv, PyBUF_SIMPLE)
    try:
        if rv.len % RECORD_SIZE or first < 0 or count < 0 or first + count > rv.len // RECORD_SIZE:
            raise ValueError("records out of range")
        envs = <pgv_env *> malloc(<size_t> (count if count else 1) * sizeof(pgv_env))
        if envs == NULL:
            raise MemoryError()
        memset(envs, 0, <size_t> (count if count else 1) * sizeof(pgv_env))
        with nogil:
            for k in range(count):
                rec = <const unsigned char *> rv.buf + (first + k) * RECORD_SIZE
                e = envs + k
                off = pgv_le64(rec + 32)
                ln = pgv_le32(rec + 40)
                if off < data_offset or off - data_offset + ln > <uint64_t> dv.len:
                    e.status = PGV_BEYOND
                    continue
                pgv_authenticate(<const unsigned char *> dv.buf + (off - data_offset), ln, rec, kind, keyp, e)
        if decompress:
            found = {}
            for k in range(count):
                e = envs + k
                if e.status == PGV_OK and e.codec == 3:
                    pgv_frame_dict(e)
                if e.status == PGV_OK and e.codec == 3:
                    if e.param not in found and e.param not in dict_errors:
                        try:
                            if dicts is None:
                                raise _IntegrityError(_fault_message(PGV_NO_DICT, e.param, kind))
                            found[e.param] = _ddict_for(dicts(e.param))
                        except _IntegrityError as exc:
                            dict_errors[e.param] = str(exc)
                    if e.param in dict_errors:
                        e.status = PGV_DICT_ERROR
                    else:
                        dd = found[e.param]
                        e.ddict = dd.ddict
            # Every object that authenticated has its raw length in out, so a caller finds
            # each one's plaintext from spans alone.
            spans = PyBytes_FromStringAndSize(NULL, count * 8)
            sp = <uint64_t *> PyBytes_AS_STRING(spans)
            for k in range(count):
                e = envs + k
                e.out_pos = total
                sp[k] = e.raw_len if (e.status == PGV_OK or e.status == PGV_DICT_ERROR
                                      or e.status == PGV_FRAME or e.status == PGV_NO_DICT) else 0
                total += sp[k]
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t> total)
            o = <unsigned char *> PyBytes_AS_STRING(out)
            with nogil:
                dctx = ZSTD_createDCtx()
                for k in range(count):
                    e = envs + k
                    if e.status == PGV_OK:
                        if dctx == NULL:
                            e.status = PGV_DECOMPRESS
                        else:
                            pgv_decompress(dctx, e, o + e.out_pos)
                    if e.status != PGV_OK and sp[k]:
                        memset(o + e.out_pos, 0, sp[k])
                if dctx != NULL:
                    ZSTD_freeDCtx(dctx)
        for k in range(count):
            e = envs + k
            if e.status == PGV_DICT_ERROR:
                faults.append((first + k, dict_errors[e.param]))
            elif e.status != PGV_OK:
                faults.append((first + k, _fault_message(e.status, e.param, kind)))
    finally:
        if envs != NULL:
            for k in range(count):
                if envs[k].plain != NULL:
                    free(envs[k].plain)
            free(envs)
        PyBuffer_Release(&rv)
        PyBuffer_Release(&dv)
        if have_key:
            PyBuffer_Release(&kv)
    return out, spans, faults


cdef extern from "<fcntl.h>":
    int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags) nogil
    unsigned int SYNC_FILE_RANGE_WRITE


def writeback(int fd, int64_t offset, int64_t nbytes) -> None:
    """Start writing a just-written range of a file to disk without waiting for it
    (sync_file_range(SYNC_FILE_RANGE_WRITE)), so the fsync at the file's end finds most of it
    already written. Only a hint: errors are left for that fsync to report."""
    with nogil:
        sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


# ==========================================================================================
# -- bounded index tables (branch memflat; pgvault/repository/index.py) ---------------------
# The index is kept as several tables of at most index.MAX_TABLE_RECORDS records (a merge
# never copies more than that), so a lookup may have to ask several: one call for all of them.
# ==========================================================================================

def index_find_any(tables, bytes block_id) -> int:
    """The position in tables (a sequence of (data, starts, bits) as index_find takes them) of
    the first table holding block_id, or -1."""
    if len(block_id) != ID_SIZE:
        raise ValueError(f"block ids are {ID_SIZE} bytes, got {len(block_id)}")
    cdef const unsigned char *idp = <const unsigned char *> PyBytes_AS_STRING(block_id)
    cdef uint32_t prefix = _prefix(idp)
    cdef const uint32_t *s
    cdef const char *d
    cdef uint32_t b
    cdef Py_ssize_t k = 0
    cdef int bits
    cdef bytes data, starts
    for data, starts, bits in tables:
        if not 1 <= bits <= 24 or len(starts) != (((<Py_ssize_t> 1) << bits) + 1) * 4:
            raise ValueError("starts do not match bits")
        s = <const uint32_t *> PyBytes_AS_STRING(starts)
        d = PyBytes_AS_STRING(data)
        b = prefix >> (32 - bits)
        if <Py_ssize_t> s[b + 1] * TABLE_RECORD > len(data):
            raise ValueError("starts do not match the records")
        if _find_key(d + s[b] * TABLE_RECORD, s[b + 1] - s[b], idp) != NULL:
            return k
        k += 1
    return -1


# ==========================================================================================
# -- the write path (backup): sealing a chunk's new blocks ----------------------------------
# Owned by the backup (pgvault/repository/blockstore.py). The exact inverse of open_blocks:
# every object it makes opens there (and through pgvault.pipeline.envelope) byte for byte.
# Same envelope as envelope.seal (docs/FORMAT.md §2); the pure twin is pgvault._pure.seal_blocks.
# ==========================================================================================

cdef extern from *:
    """
    /* Page class (blockstore.page_class): 1 when the block starts with a PostgreSQL page that
       has special space (index pages), so it is compressed with that class's dictionary. */
    static int pgv_page_class(const unsigned char *p, size_t n)
    {
        unsigned lower, upper, special;
        if (n < 8192) return 0;
        lower = p[12] | (p[13] << 8);
        upper = p[14] | (p[15] << 8);
        special = p[16] | (p[17] << 8);
        return 24 <= lower && lower <= upper && upper <= special && special < 8192;
    }

    /* The most one sealed object of n raw bytes takes: header, nonce, the larger of the
       compressed bound and n (stored), and tag or checksum. */
    static size_t pgv_seal_bound(size_t n)
    {
        size_t zb = ZSTD_compressBound(n);
        size_t lb = (size_t) LZ4_compressBound((int) (n > 0x7e000000 ? 0x7e000000 : n));
        size_t b = zb > lb ? zb : lb;
        return 16 + 24 + (b > n ? b : n) + 16;
    }

    /* Seal one block into dst (capacity pgv_seal_bound(n)); returns its length, or 0 when the
       compressor failed. codec: 0 none, 1 zstd (with cdict: written as 3, zstd with a
       repository dictionary), 2 lz4; stored as 0 when compression does not make it smaller.
       key: the data key (XChaCha20-Poly1305, random nonce) or NULL (xxh3-128 checksum over
       header || context || payload). */
    static size_t pgv_seal_one(ZSTD_CCtx *cctx, const ZSTD_CDict *cdict, int codec, int level,
                               int kind, const unsigned char *src, size_t n,
                               const unsigned char *ctx, const unsigned char *key, unsigned char *dst)
    {
        unsigned char *payload = dst + 16 + (key != NULL ? 24 : 0);
        size_t cap = pgv_seal_bound(n) - 16 - 24 - 16;
        size_t plen = 0;
        int used = 0;
        uint64_t raw = n;
        if (codec == 1 || codec == 3) {
            size_t r = cdict != NULL
                ? ZSTD_compress_usingCDict(cctx, payload, cap, src, n, cdict)
                : ZSTD_compressCCtx(cctx, payload, cap, src, n, level);
            if (ZSTD_isError(r)) return 0;
            plen = r;
            used = cdict != NULL ? 3 : 1;
        } else if (codec == 2) {
            int r = LZ4_compress_default((const char *) src, (char *) payload, (int) n, (int) cap);
            if (r <= 0 && n > 0) return 0;
            plen = (size_t) r;
            used = 2;
        }
        if (used == 0 || plen >= n) {
            memcpy(payload, src, n);
            plen = n;
            used = 0;
        }
        memcpy(dst, "PGVO", 4);
        dst[4] = 1;
        dst[5] = (unsigned char) kind;
        dst[6] = (unsigned char) used;
        dst[7] = key != NULL ? 1 : 0;
        memcpy(dst + 8, &raw, 8);  /* little-endian hosts only, as the read path */
        if (key != NULL) {
            unsigned char aad[16 + 32];
            unsigned long long clen = 0;
            memcpy(aad, dst, 16);
            memcpy(aad + 16, ctx, 32);
            randombytes_buf(dst + 16, 24);
            /* in place: libsodium's AEAD allows the ciphertext to overlap the message */
            crypto_aead_xchacha20poly1305_ietf_encrypt(payload, &clen, payload, plen, aad, sizeof(aad),
                                                       NULL, dst + 16, key);
            return 16 + 24 + (size_t) clen;
        } else {
            XXH3_state_t st;
            XXH128_canonical_t c;
            XXH3_128bits_reset(&st);
            XXH3_128bits_update(&st, dst, 16);
            XXH3_128bits_update(&st, ctx, 32);
            XXH3_128bits_update(&st, payload, plen);
            XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
            memcpy(payload + plen, c.digest, 16);
            return 16 + plen + 16;
        }
    }
    """
    ctypedef struct ZSTD_CCtx:
        pass
    ctypedef struct ZSTD_CDict:
        pass
    ZSTD_CCtx *ZSTD_createCCtx() nogil
    size_t ZSTD_freeCCtx(ZSTD_CCtx *) nogil
    ZSTD_CDict *ZSTD_createCDict(const void *buf, size_t size, int level) nogil
    size_t ZSTD_freeCDict(ZSTD_CDict *) nogil
    int pgv_page_class(const unsigned char *p, size_t n) nogil
    size_t pgv_seal_bound(size_t n) nogil
    size_t pgv_seal_one(ZSTD_CCtx *cctx, const ZSTD_CDict *cdict, int codec, int level, int kind,
                        const unsigned char *src, size_t n, const unsigned char *ctx,
                        const unsigned char *key, unsigned char *dst) nogil


cdef class _CompressionDict:
    """A ZSTD_CDict made once from a repository dictionary at one level, shared by every
    thread: python-zstandard's multi_compress_to_buffer built one for every call (a chunk),
    18% of the compression time of 8 KiB blocks."""
    cdef ZSTD_CDict *cdict
    cdef object source  # the ZstdCompressionDict, kept alive so its id() is not reused

    def __dealloc__(self):
        if self.cdict != NULL:
            ZSTD_freeCDict(self.cdict)


cdef class _CompressionContext:
    """One ZSTD_CCtx, used by one call at a time (taken from and returned to _cctxs)."""
    cdef ZSTD_CCtx *cctx

    def __cinit__(self):
        self.cctx = ZSTD_createCCtx()
        if self.cctx == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.cctx != NULL:
            ZSTD_freeCCtx(self.cctx)


# (id(ZstdCompressionDict), level) -> _CompressionDict; few dictionaries per repository, kept.
cdef dict _cdicts = {}
# Idle compression contexts: list.pop and list.append are atomic under the GIL, so each call
# owns the one it popped; there are never more than the threads that ever sealed at once.
cdef list _cctxs = []


cdef _CompressionDict _cdict_for(object zdict, int level):
    cdef _CompressionDict d = _cdicts.get((id(zdict), level))
    cdef bytes raw
    if d is not None and d.source is zdict:
        return d
    raw = zdict.as_bytes()
    d = _CompressionDict()
    d.cdict = ZSTD_createCDict(PyBytes_AS_STRING(raw), <size_t> len(raw), level)
    if d.cdict == NULL:
        raise MemoryError()
    d.source = zdict
    _cdicts[(id(zdict), level)] = d
    return d


def seal_blocks(data, Py_ssize_t block_size, ids, members, int kind, int codec, int level, zdicts, key) -> tuple:
    """Seal blocks of data (block i is data[i*block_size:(i+1)*block_size], the last may be
    short) for the indices in members, each with its 32-byte context ids[32*i:32*i+32],
    as envelope.seal would: compressed with codec (0 none, 1 zstd, 2 lz4; 3 is taken as 1) at
    level, zstd blocks with zdicts[page class] when that is not None (codec 3 then), stored
    when compression does not make a block smaller; key: the data key, or None (unencrypted
    repository: xxh3-128 checksum).

    Returns (out, ends, classes): out, the sealed objects one after another; ends, one u64
    per member, the end of its object in out; classes, one byte per member, 1 for a page
    with special space (blockstore.page_class "s"), else 0. Runs without the GIL."""
    cdef Py_buffer dv, iv, kv
    cdef const unsigned char *keyp = NULL
    cdef int have_key = key is not None
    cdef Py_ssize_t count = len(members), k, i, nblocks
    cdef size_t *idx = NULL
    cdef size_t bound = 0, pos = 0, n, got
    cdef unsigned char *scratch = NULL
    cdef const ZSTD_CDict *cd[2]
    cdef _CompressionDict d0 = None, d1 = None
    cdef _CompressionContext ctx = None
    cdef bytes out, ends, classes
    cdef uint64_t *ep
    cdef unsigned char *cp
    cdef const unsigned char *src
    cdef int failed = 0
    if codec == 3:
        codec = 1
    if codec not in (0, 1, 2):
        raise ValueError(f"unknown codec id {codec}")
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    cd[0] = cd[1] = NULL
    if codec == 1:
        if zdicts[0] is not None:
            d0 = _cdict_for(zdicts[0], level)
            cd[0] = d0.cdict
        if zdicts[1] is not None:
            d1 = _cdict_for(zdicts[1], level)
            cd[1] = d1.cdict
    if have_key:
        keyp = _data_key(key, &kv)
    PyObject_GetBuffer(data, &dv, PyBUF_SIMPLE)
    PyObject_GetBuffer(ids, &iv, PyBUF_SIMPLE)
    try:
        nblocks = (dv.len + block_size - 1) // block_size
        if iv.len != nblocks * 32:
            raise ValueError("ids must hold 32 bytes for each block of data")
        idx = <size_t *> malloc(<size_t> (count if count else 1) * sizeof(size_t))
        if idx == NULL:
            raise MemoryError()
        for k in range(count):
            i = members[k]
            if i < 0 or i >= nblocks:
                raise ValueError(f"block {i} is beyond the data")
            idx[k] = <size_t> i
            n = <size_t> min(block_size, dv.len - i * block_size)
            bound += pgv_seal_bound(n)
        scratch = <unsigned char *> malloc(bound if bound else 1)
        if scratch == NULL:
            raise MemoryError()
        ends = PyBytes_FromStringAndSize(NULL, count * 8)
        classes = PyBytes_FromStringAndSize(NULL, count)
        ep = <uint64_t *> PyBytes_AS_STRING(ends)
        cp = <unsigned char *> PyBytes_AS_STRING(classes)
        if codec == 1:
            try:
                ctx = _cctxs.pop()
            except IndexError:
                ctx = _CompressionContext()
        with nogil:
            for k in range(count):
                src = <const unsigned char *> dv.buf + idx[k] * block_size
                n = <size_t> block_size
                if <size_t> (dv.len - idx[k] * block_size) < n:
                    n = <size_t> (dv.len - idx[k] * block_size)
                cp[k] = <unsigned char> pgv_page_class(src, n)
                got = pgv_seal_one(ctx.cctx if ctx is not None else NULL, cd[cp[k]], codec, level, kind,
                                   src, n, <const unsigned char *> iv.buf + idx[k] * 32, keyp, scratch + pos)
                if got == 0:
                    failed = 1
                    break
                pos += got
                ep[k] = pos
        if ctx is not None:
            _cctxs.append(ctx)
        if failed:
            raise RuntimeError("compression failed")
        out = PyBytes_FromStringAndSize(<const char *> scratch, <Py_ssize_t> pos)
    finally:
        free(scratch)
        free(idx)
        PyBuffer_Release(&iv)
        PyBuffer_Release(&dv)
        if have_key:
            PyBuffer_Release(&kv)
    return out, ends, classes


cdef extern from *:
    """
    #ifdef PGV_HAVE_BLAKE3
    #include "blake3.h"
    #define PGV_BLAKE3 1
    /* Keyed BLAKE3 of each block_size piece of src (the last may be short), 32 bytes each,
       into out: the content ids of Keys.block_id. */
    static void pgv_block_ids(const unsigned char *src, size_t len, size_t block_size,
                              const unsigned char *key, unsigned char *out)
    {
        size_t pos, n;
        blake3_hasher h;
        for (pos = 0; pos < len; pos += block_size, out += 32) {
            n = len - pos < block_size ? len - pos : block_size;
            blake3_hasher_init_keyed(&h, key);
            blake3_hasher_update(&h, src + pos, n);
            blake3_hasher_finalize(&h, out, 32);
        }
    }
    #else
    #define PGV_BLAKE3 0
    static void pgv_block_ids(const unsigned char *src, size_t len, size_t block_size,
                              const unsigned char *key, unsigned char *out) { }
    #endif
    """
    int PGV_BLAKE3
    void pgv_block_ids(const unsigned char *src, size_t len, size_t block_size,
                       const unsigned char *key, unsigned char *out) nogil


# True when block_ids runs BLAKE3's C implementation without the GIL (built with it, setup.py).
BLAKE3_NATIVE = bool(PGV_BLAKE3)


def block_ids(data, Py_ssize_t block_size, key) -> bytes:
    """Content ids (keyed BLAKE3, as crypto.Keys.block_id) of each block_size piece of data,
    the last may be short: 32 bytes each, concatenated. Without the GIL when BLAKE3's C
    sources were built in: through the blake3 package, the ids of a first full held the GIL
    ~0.7 s, time in which neither the stream reader nor the other worker ran Python."""
    cdef Py_buffer dv, kv
    cdef bytes out
    cdef unsigned char *o
    cdef Py_ssize_t count
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if not PGV_BLAKE3:
        from pgvault._pure import block_ids as pure_block_ids
        return pure_block_ids(data, block_size, key)
    PyObject_GetBuffer(key, &kv, PyBUF_SIMPLE)
    PyObject_GetBuffer(data, &dv, PyBUF_SIMPLE)
    try:
        if kv.len != 32:
            raise ValueError("the id key is 32 bytes")
        count = (dv.len + block_size - 1) // block_size
        out = PyBytes_FromStringAndSize(NULL, count * 32)
        o = <unsigned char *> PyBytes_AS_STRING(out)
        with nogil:
            pgv_block_ids(<const unsigned char *> dv.buf, <size_t> dv.len, <size_t> block_size,
                          <const unsigned char *> kv.buf, o)
    finally:
        PyBuffer_Release(&dv)
        PyBuffer_Release(&kv)
    return out


# ==========================================================================================
# -- the index on disk (pgvault/repository/diskindex.py) ------------------------------------
# A file of 2**bits buckets of DISK_BUCKET bytes: a header (u32 record count, u32 flags, 24
# zero bytes), then up to DISK_SLOTS table records; a record's home bucket is the top bits of
# its id's first 4 bytes; linear probing, every full bucket passed flagged DISK_OVERFLOW.
# Layout and semantics: pgvault._pure (bucket_fill, bucket_records, disk_locate), the twin.
# ==========================================================================================

from libc.errno cimport EINTR, errno
from posix.unistd cimport pread

cdef enum:
    DISK_BUCKET = 4096
    DISK_SLOTS = 127
    DISK_OVERFLOW = 1


cdef inline void _store_le32(unsigned char *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


cdef int _check_disk_bits(int bits) except -1:
    if not 1 <= bits <= 24:
        raise ValueError(f"bits must be in 1..24, got {bits}")
    return 0


def bucket_fill(region, Py_ssize_t first, int bits, records, bint carry) -> bytes:
    """Place 32-byte table records into region, whole buckets first.. of a file of 2**bits
    buckets (see pgvault._pure.bucket_fill); returns the records that ran past its end."""
    cdef Py_buffer rv, dv
    cdef Py_ssize_t count, n, k, b = 0, m = 0
    cdef unsigned char *head
    cdef const unsigned char *src
    cdef unsigned char *rest = NULL
    cdef uint32_t used = 0, flags
    cdef int status = 0
    _check_disk_bits(bits)
    PyObject_GetBuffer(region, &rv, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        if rv.len % DISK_BUCKET:
            raise ValueError(f"a region is whole {DISK_BUCKET}-byte buckets")
        count = rv.len // DISK_BUCKET
        if first < 0 or first + count > ((<Py_ssize_t> 1) << bits):
            raise ValueError("the region is outside the file")
        PyObject_GetBuffer(records, &dv, PyBUF_SIMPLE)
        try:
            if dv.len % TABLE_RECORD:
                raise ValueError("table records are 32 bytes")
            n = dv.len // TABLE_RECORD
            rest = <unsigned char *> malloc(dv.len if dv.len else 1)
            if rest == NULL:
                raise MemoryError()
            with nogil:
                for k in range(n):
                    src = <const unsigned char *> dv.buf + k * TABLE_RECORD
                    if carry:
                        b = 0
                    else:
                        b = <Py_ssize_t> (_prefix(src) >> (32 - bits)) - first
                        if b < 0 or b >= count:
                            status = 1
                            break
                    while b < count:
                        head = <unsigned char *> rv.buf + b * DISK_BUCKET
                        used = pgv_le32(head)
                        flags = pgv_le32(head + 4)
                        if used > DISK_SLOTS:
                            status = 2
                            break
                        if used < DISK_SLOTS:
                            memcpy(head + TABLE_RECORD + used * TABLE_RECORD, src, TABLE_RECORD)
                            _store_le32(head, used + 1)
                            break
                        _store_le32(head + 4, flags | DISK_OVERFLOW)
                        b += 1
                    if status:
                        break
                    if b >= count:
                        memcpy(rest + m * TABLE_RECORD, src, TABLE_RECORD)
                        m += 1
            if status == 1:
                raise ValueError("a record's home bucket is outside the region")
            if status == 2:
                raise ValueError(f"bucket {first + b} claims {used} records")
            return PyBytes_FromStringAndSize(<char *> rest, m * TABLE_RECORD)
        finally:
            free(rest)
            PyBuffer_Release(&dv)
    finally:
        PyBuffer_Release(&rv)


def bucket_records(region) -> bytes:
    """The records of whole buckets, bucket by bucket."""
    cdef Py_buffer rv
    cdef Py_ssize_t b, count, total = 0, pos = 0
    cdef const unsigned char *head
    cdef uint32_t used
    cdef bytes out
    cdef char *o
    PyObject_GetBuffer(region, &rv, PyBUF_SIMPLE)
    try:
        if rv.len % DISK_BUCKET:
            raise ValueError(f"a region is whole {DISK_BUCKET}-byte buckets")
        count = rv.len // DISK_BUCKET
        for b in range(count):
            used = pgv_le32(<const unsigned char *> rv.buf + b * DISK_BUCKET)
            if used > DISK_SLOTS:
                raise ValueError(f"bucket {b} claims {used} records")
            total += used
        out = PyBytes_FromStringAndSize(NULL, total * TABLE_RECORD)
        o = PyBytes_AS_STRING(out)
        for b in range(count):
            head = <const unsigned char *> rv.buf + b * DISK_BUCKET
            used = pgv_le32(head)
            memcpy(o + pos, head + TABLE_RECORD, used * TABLE_RECORD)
            pos += used * TABLE_RECORD
        return out
    finally:
        PyBuffer_Release(&rv)


def disk_locate(int fd, int bits, ids, out) -> int:
    """index_locate against the index file open at fd (2**bits buckets), one pread of a
    bucket per lookup, without the GIL (see pgvault._pure.disk_locate)."""
    cdef Py_buffer iv, ov
    cdef Py_ssize_t n, k, step, got = 0, found = 0
    cdef Py_ssize_t nb = (<Py_ssize_t> 1) << bits
    cdef const unsigned char *idp
    cdef unsigned char *rec
    cdef unsigned char bucket[DISK_BUCKET]
    cdef uint32_t used = 0, flags
    cdef Py_ssize_t b = 0
    cdef int status = 0, err = 0
    cdef const char *hit
    _check_disk_bits(bits)
    PyObject_GetBuffer(ids, &iv, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &ov, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if iv.len % ID_SIZE or ov.len != iv.len // ID_SIZE * RECORD_SIZE:
                raise ValueError("out must hold one 48-byte record per 32-byte id")
            n = iv.len // ID_SIZE
            with nogil:
                for k in range(n):
                    idp = <const unsigned char *> iv.buf + k * ID_SIZE
                    rec = <unsigned char *> ov.buf + k * RECORD_SIZE
                    if pgv_le32(rec + 40) != 0:
                        continue
                    memcpy(rec, idp, ID_SIZE)
                    memset(rec + ID_SIZE, 0, RECORD_SIZE - ID_SIZE)
                    b = _prefix(idp) >> (32 - bits)
                    for step in range(nb):
                        while True:
                            got = pread(fd, bucket, DISK_BUCKET, b * DISK_BUCKET)
                            if got >= 0 or errno != EINTR:
                                break
                        if got < 0:
                            err = errno
                            status = 1
                            break
                        if got != DISK_BUCKET:
                            status = 2
                            break
                        used = pgv_le32(bucket)
                        flags = pgv_le32(bucket + 4)
                        if used > DISK_SLOTS:
                            status = 3
                            break
                        hit = _find_key(<const char *> bucket + TABLE_RECORD, used, idp)
                        if hit != NULL:
                            memcpy(rec + ID_SIZE, hit + KEY_SIZE, TABLE_RECORD - KEY_SIZE)
                            found += 1
                        if hit != NULL or not (flags & DISK_OVERFLOW):
                            break
                        b = (b + 1) & (nb - 1)
                    if status:
                        break
        finally:
            PyBuffer_Release(&ov)
    finally:
        PyBuffer_Release(&iv)
    if status == 1:
        import os
        raise OSError(err, os.strerror(err))
    if status == 2:
        raise OSError(f"index file: short read of bucket {b}")
    if status == 3:
        raise ValueError(f"bucket {b} claims {used} records")
    return found
