"""Compression codecs, keyed by the one-byte id stored in every object header.

Ids are part of the on-disk format (docs/FORMAT.md): never renumber them.
Compressor objects are not thread-safe, so each thread keeps its own.

ZSTD_DICT is zstd with a repository dictionary (docs/FORMAT.md §4a): the zstd frame header
names the dictionary by its 32-bit id, and the reader looks it up through a ``Dictionaries``
callable. Small blocks of one database look alike (page headers, line pointers, tuple
headers), so a dictionary trained on the repository's own blocks compresses each block as if it
were part of a larger whole: 8 KiB pgbench blocks went from 11.9x to 19.6x, and faster.
"""

from __future__ import annotations

import threading
from enum import IntEnum
from typing import Any, Callable

import zstandard

from pgvault.errors import ConfigError, IntegrityError


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1
    LZ4 = 2
    ZSTD_DICT = 3  # written only when a dictionary is given; never chosen by name


# Finds a dictionary by the id in a frame header; raises IntegrityError when it is unknown.
Dictionaries = Callable[[int], zstandard.ZstdCompressionDict]


# zstd level 1: on 64 KiB blocks of pgbench pages it ran 1.57 GB/s against 1.30 GB/s at
# level 3, with the same ratio (36.0x) -- block-sized inputs leave level 3 nothing to find.
DEFAULT_LEVELS = {Codec.NONE: 0, Codec.ZSTD: 1, Codec.LZ4: 0, Codec.ZSTD_DICT: 1}

_local = threading.local()
_lz4: Any = None  # lz4.block, imported on first use (6 ms that wal-push with zstd never needs)


def _lz4_block() -> Any:
    global _lz4
    if _lz4 is None:
        import lz4.block

        _lz4 = lz4.block
    return _lz4


def codec_by_name(name: str) -> Codec:
    try:
        return {"none": Codec.NONE, "zstd": Codec.ZSTD, "lz4": Codec.LZ4}[name]
    except KeyError:
        raise ConfigError(f"unknown compression {name!r}: use zstd, lz4 or none") from None


def _zstd_compressor(level: int, zdict: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdCompressor:
    cache: dict[tuple[int, int], zstandard.ZstdCompressor] = _local.__dict__.setdefault("zstd_c", {})
    key = (level, 0 if zdict is None else zdict.dict_id())
    comp = cache.get(key)
    if comp is None:
        if zdict is None:
            comp = zstandard.ZstdCompressor(level=level, write_content_size=True)
        else:
            comp = zstandard.ZstdCompressor(level=level, write_content_size=True, dict_data=zdict)
        cache[key] = comp
    return comp


def _zstd_decompressor(zdict: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdDecompressor:
    cache: dict[int, zstandard.ZstdDecompressor] = _local.__dict__.setdefault("zstd_d", {})
    key = 0 if zdict is None else zdict.dict_id()
    dec = cache.get(key)
    if dec is None:
        dec = cache[key] = zstandard.ZstdDecompressor() if zdict is None else zstandard.ZstdDecompressor(dict_data=zdict)
    return dec


def frame_dict_id(data: bytes | memoryview) -> int:
    """The dictionary id a zstd frame header names (0: none)."""
    try:
        return int(zstandard.get_frame_parameters(data).dict_id)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"object has a bad zstd frame header: {exc}") from None


def compress(
    codec: Codec,
    data: bytes | memoryview,
    level: int | None = None,
    zdict: zstandard.ZstdCompressionDict | None = None,
) -> tuple[Codec, bytes]:
    """Compress data; returns the codec actually used.

    Falls back to NONE when compression does not shrink the data, so incompressible
    blocks cost no decompression on restore and no expansion in the repository.
    zdict: with ZSTD (or ZSTD_DICT), compress with this dictionary and return ZSTD_DICT.
    """
    if codec == Codec.NONE:
        return Codec.NONE, bytes(data)
    if codec in (Codec.ZSTD, Codec.ZSTD_DICT):
        codec = Codec.ZSTD if zdict is None else Codec.ZSTD_DICT
        out = _zstd_compressor(DEFAULT_LEVELS[codec] if level is None else level, zdict).compress(data)
    elif codec == Codec.LZ4:
        out = _lz4_block().compress(data, store_size=False, mode="default")
    else:
        raise ConfigError(f"unknown codec id {int(codec)}")
    if len(out) >= len(data):
        return Codec.NONE, bytes(data)
    return codec, out


def decompress(codec: int, data: bytes | memoryview, raw_length: int, dicts: Dictionaries | None = None) -> bytes:
    """Inverse of compress; raw_length comes from the object header. dicts: looks up the
    dictionary a ZSTD_DICT frame names (objects of other codecs never need it)."""
    try:
        if codec == Codec.NONE:
            out = bytes(data)
        elif codec == Codec.ZSTD:
            out = _zstd_decompressor().decompress(data, max_output_size=raw_length)
        elif codec == Codec.ZSTD_DICT:
            dict_id = frame_dict_id(data)
            if dicts is None or not dict_id:
                raise IntegrityError(f"object needs compression dictionary {dict_id:08x}, which is not available here")
            out = _zstd_decompressor(dicts(dict_id)).decompress(data, max_output_size=raw_length)
        elif codec == Codec.LZ4:
            lz4_block = _lz4_block()
            try:
                out = lz4_block.decompress(data, uncompressed_size=raw_length)
            except lz4_block.LZ4BlockError as exc:
                raise IntegrityError(f"object failed to decompress: {exc}") from None
        else:
            raise IntegrityError(f"object uses unknown codec id {codec}")
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"object failed to decompress: {exc}") from None
    if len(out) != raw_length:
        raise IntegrityError("object decompressed to the wrong length")
    return out
