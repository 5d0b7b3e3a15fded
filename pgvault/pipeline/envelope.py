"""The self-describing object envelope every stored object uses (docs/FORMAT.md §2).

    header (16 bytes): magic "PGVO" | version u8 | kind u8 | codec u8 | key id u8 | raw length u64 LE
    key id 0: compressed payload | xxh3-128(header || context || payload)
    key id 1: nonce(24) | XChaCha20-Poly1305(compressed payload, aad = header || context)

``context`` is what the object is stored as (a block id, or an object key), so a valid
object moved to another name fails to open instead of restoring the wrong bytes.
"""

from __future__ import annotations

import struct
from enum import IntEnum

import xxhash
import zstandard

from pgvault.errors import IntegrityError
from pgvault.pipeline import codecs, crypto
from pgvault.pipeline.crypto import Keys

MAGIC = b"PGVO"
VERSION = 1
HEADER = struct.Struct("<4sBBBBQ")
CHECKSUM_SIZE = 16


class Kind(IntEnum):
    BLOCK = 1
    MANIFEST = 2
    WAL = 3
    INDEX = 4
    STANZA = 5
    PACK_TRAILER = 6
    LOCK = 7
    REPORT = 8
    PIN = 9
    DICT = 10


def seal(
    keys: Keys,
    kind: Kind,
    plaintext: bytes | memoryview,
    context: bytes,
    codec: codecs.Codec,
    level: int | None = None,
    zdict: zstandard.ZstdCompressionDict | None = None,
) -> bytes:
    """Compress (with zdict, a repository dictionary, when given), then encrypt or checksum."""
    used, payload = codecs.compress(codec, plaintext, level, zdict)
    key_id = 1 if keys.encrypted else 0
    header = HEADER.pack(MAGIC, VERSION, kind, used, key_id, len(plaintext))
    if keys.data_key is not None:
        return header + crypto.seal(keys.data_key, payload, header + context)
    # Streamed, not over a concatenation: a 4 MiB block list or a 16 MiB WAL segment is not
    # copied once more just to be hashed.
    digest = xxhash.xxh3_128(header)
    digest.update(context)
    digest.update(payload)
    return b"".join((header, payload, digest.digest()))


def open_(
    keys: Keys,
    sealed: bytes | memoryview,
    context: bytes,
    kind: Kind | None = None,
    dicts: codecs.Dictionaries | None = None,
) -> bytes:
    """Verify and decode an object made by seal(); IntegrityError on any mismatch.
    dicts: finds the compression dictionary a ZSTD_DICT object names (blocks only)."""
    codec, payload, raw_length = _authenticated_payload(keys, sealed, context, kind)
    return codecs.decompress(codec, payload, raw_length, dicts)


def authenticate(keys: Keys, sealed: bytes | memoryview, context: bytes, kind: Kind | None = None) -> None:
    """Check an object's tag or checksum over its stored bytes without decompressing it
    (what verify does by default: any change to the stored bytes fails here)."""
    _authenticated_payload(keys, sealed, context, kind)


def verified_payload(
    keys: Keys, sealed: bytes | memoryview, context: bytes, kind: Kind | None = None
) -> tuple[int, bytes | memoryview, int]:
    """(codec, stored payload, raw length) of an authenticated object, for a caller that
    decompresses it as a stream (the WAL prefetcher writes 16 MiB segments a chunk at a
    time instead of building each one in memory first)."""
    return _authenticated_payload(keys, sealed, context, kind)


def _authenticated_payload(
    keys: Keys, sealed: bytes | memoryview, context: bytes, kind: Kind | None
) -> tuple[int, bytes | memoryview, int]:
    sealed = memoryview(sealed)
    if len(sealed) < HEADER.size:
        raise IntegrityError("object is truncated")
    magic, version, obj_kind, codec, key_id, raw_length = HEADER.unpack_from(sealed)
    if magic != MAGIC:
        raise IntegrityError("object has a bad magic number (not a pgvault object)")
    if version != VERSION:
        raise IntegrityError(f"object format version {version} is not supported by this pgvault")
    if kind is not None and obj_kind != kind:
        raise IntegrityError(f"object is a {obj_kind}, expected {int(kind)}")
    header = bytes(sealed[: HEADER.size])
    body = sealed[HEADER.size :]
    if key_id == 1:
        if keys.data_key is None:
            raise IntegrityError("object is encrypted but the repository is not")
        payload: bytes | memoryview = crypto.unseal(keys.data_key, body, header + context)
    elif key_id == 0:
        if keys.encrypted:
            raise IntegrityError("unencrypted object in an encrypted repository")
        payload = body[:-CHECKSUM_SIZE]
        expect = bytes(body[-CHECKSUM_SIZE:])
        hasher = xxhash.xxh3_128(header)
        hasher.update(context)
        hasher.update(payload)
        if len(body) < CHECKSUM_SIZE or hasher.digest() != expect:
            raise IntegrityError("object checksum mismatch (corrupted)")
    else:
        raise IntegrityError(f"object uses unknown key id {key_id}")
    return codec, payload, raw_length
