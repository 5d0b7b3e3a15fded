"""Repository: the repository config and keys, stanzas, manifests, blocks and WAL on a backend.

Everything above this module speaks in stanzas, backups, blocks and WAL names; everything
below it speaks in keys and bytes.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import zstandard

from pgvault import _accel
from pgvault.backends.base import Backend, ObjectNotFound
from pgvault.errors import (
    ConfigError,
    IntegrityError,
    NotFoundError,
    PgvaultError,
    RepositoryError,
    WalError,
    WalNotFoundError,
)
from pgvault.pipeline import codecs, crypto, envelope
from pgvault.pipeline.crypto import Keys
from pgvault.pipeline.envelope import Kind
from pgvault.repository import layout
from pgvault.repository.index import ID_SIZE, RECORD, Index, Location, decode_body, unpack_entries
from pgvault.repository.manifest import FileEntry, Manifest

REPO_FORMAT = 1
# Block size: see docs/FORMAT.md §4 for the measurement behind the default.
DEFAULT_BLOCK_SIZE = 8 * 1024
DEFAULT_PACK_SIZE = 32 * 1024 * 1024


@dataclass(frozen=True)
class RepoSettings:
    block_size: int
    pack_size: int


@dataclass(frozen=True)
class StanzaInfo:
    stanza: str
    system_id: str
    pg_version: int
    wal_segment_size: int
    created: str


class Repository:
    def __init__(self, backend: Backend, keys: Keys, settings: RepoSettings) -> None:
        self.backend = backend
        self.keys = keys
        self.settings = settings
        self._index: Index | None = None
        self._index_lock = threading.Lock()
        self._dict_keys: dict[int, str] | None = None  # dictionary id -> key, from one listing
        self._dicts: dict[int, zstandard.ZstdCompressionDict] = {}
        # Progress hook: called with the plaintext size of each block read_blocks yields.
        self.on_read: Callable[[int], None] | None = None

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, backend: Backend, passphrase: bytes | None) -> Repository:
        try:
            raw = backend.get(layout.CONFIG)
        except ObjectNotFound:
            raise RepositoryError(
                f"no pgvault repository at {backend.describe()}: run 'pgvault stanza-create' first"
            ) from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise IntegrityError(f"repository config at {backend.describe()} is corrupt") from None
        if doc.get("format") != REPO_FORMAT:
            raise RepositoryError(f"repository format {doc.get('format')} is not supported by this pgvault")
        keys = crypto.open_keys(doc["keys"], passphrase)
        return cls(backend, keys, RepoSettings(int(doc["block_size"]), int(doc["pack_size"])))

    @classmethod
    def create(cls, backend: Backend, passphrase: bytes | None, settings: RepoSettings) -> Repository:
        """Create the repository if absent (put-if-absent, so racing creators agree), then open."""
        keys, desc = crypto.new_keys(passphrase)
        doc = {
            "format": REPO_FORMAT,
            "created": _now(),
            "keys": desc,
            "block_size": settings.block_size,
            "pack_size": settings.pack_size,
        }
        backend.put_if_absent(layout.CONFIG, json.dumps(doc, indent=1).encode())
        return cls.open(backend, passphrase)

    # -- sealed metadata objects ----------------------------------------------------------

    def _seal(self, kind: Kind, key: str, data: bytes) -> bytes:
        return envelope.seal(self.keys, kind, data, key.encode(), codecs.Codec.ZSTD)

    def _get_sealed(self, kind: Kind, key: str) -> bytes:
        return envelope.open_(self.keys, self.backend.get(key), key.encode(), kind)

    # -- stanzas --------------------------------------------------------------------------

    def stanza_info(self, stanza: str) -> StanzaInfo:
        key = layout.stanza_key(layout.check_stanza(stanza))
        try:
            doc = json.loads(self._get_sealed(Kind.STANZA, key))
        except ObjectNotFound:
            raise ConfigError(
                f"unknown stanza {stanza!r} in {self.backend.describe()}: run 'pgvault --stanza={stanza} stanza-create'"
            ) from None
        return StanzaInfo(**doc)

    def create_stanza(self, info: StanzaInfo) -> bool:
        """Record the cluster for a stanza; False if it already existed (the caller compares)."""
        key = layout.stanza_key(layout.check_stanza(info.stanza))
        return self.backend.put_if_absent(key, self._seal(Kind.STANZA, key, json.dumps(asdict(info)).encode()))

    def stanzas(self) -> list[str]:
        return sorted(
            {info.key.split("/")[1] for info in self.backend.list("stanzas/") if info.key.endswith("/stanza")}
        )

    # -- manifests ------------------------------------------------------------------------

    def list_backups(self, stanza: str) -> list[str]:
        prefix = layout.manifest_prefix(stanza)
        return sorted(
            info.key[len(prefix) : -len(".manifest")]
            for info in self.backend.list(prefix)
            if info.key.endswith(".manifest")
        )

    def latest_manifest(self, stanza: str) -> Manifest | None:
        backups = self.list_backups(stanza)
        return self.load_manifest(stanza, backups[-1]) if backups else None

    def save_manifest(self, manifest: Manifest) -> int:
        """Write the manifest: the commit point of a backup. Never overwrites."""
        key = layout.manifest_key(manifest.stanza, manifest.backup_id)
        sealed = self._seal(Kind.MANIFEST, key, manifest.to_bytes())
        if not self.backend.put_if_absent(key, sealed):
            raise RepositoryError(f"backup {manifest.backup_id} already exists in stanza {manifest.stanza}")
        return len(sealed)

    def load_manifest(self, stanza: str, backup_id: str) -> Manifest:
        key = layout.manifest_key(stanza, backup_id)
        try:
            return Manifest.from_bytes(self._get_sealed(Kind.MANIFEST, key))
        except ObjectNotFound:
            raise NotFoundError(f"backup {backup_id} not found in stanza {stanza}") from None

    # -- blocks ---------------------------------------------------------------------------

    @property
    def index(self) -> Index:
        # Locked: restore's workers all reach for it at once, and each loaded its own copy
        # (a scale-300 restore peaked at 105 MB instead of 77 MB).
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    self._index = self._load_index()
        return self._index

    def _load_index(self) -> Index:
        index = Index()
        index.load(decode_body(self._get_sealed(Kind.INDEX, info.key)) for info in self.backend.list("index/"))
        return index

    # -- compression dictionaries (docs/FORMAT.md §4a) ------------------------------------

    def _list_dictionaries(self) -> dict[int, str]:
        if self._dict_keys is None:
            keys = sorted(info.key for info in self.backend.list(layout.DICT_PREFIX))
            self._dict_keys = {int(key.rsplit("-", 1)[1], 16): key for key in keys}
        return self._dict_keys

    def dictionary(self, dict_id: int) -> zstandard.ZstdCompressionDict:
        """The dictionary a ZSTD_DICT block names (codecs.Dictionaries)."""
        zdict = self._dicts.get(dict_id)
        if zdict is not None:
            return zdict
        key = self._list_dictionaries().get(dict_id)
        if key is None:
            self._dict_keys = None  # written after our listing, by a concurrent backup?
            key = self._list_dictionaries().get(dict_id)
        if key is None:
            raise IntegrityError(f"compression dictionary {dict_id:08x} is missing from the repository")
        try:
            raw = self._get_sealed(Kind.DICT, key)
        except ObjectNotFound:
            raise IntegrityError(f"compression dictionary {key} is missing from the repository") from None
        zdict = zstandard.ZstdCompressionDict(raw)
        if zdict.dict_id() != dict_id:
            raise IntegrityError(f"compression dictionary {key} has id {zdict.dict_id():08x}")
        self._dicts[dict_id] = zdict
        return zdict

    def current_dictionary(self, page_class: str = "") -> zstandard.ZstdCompressionDict | None:
        """The newest dictionary of a page class, which new blocks of that class are compressed
        with; None if there is none."""
        ids = [dict_id for dict_id, key in self._list_dictionaries().items() if layout.dict_class(key) == page_class]
        return self.dictionary(ids[-1]) if ids else None

    def save_dictionary(self, raw: bytes, dict_id: int, page_class: str = "") -> zstandard.ZstdCompressionDict | None:
        """Store a trained dictionary (before any block that uses it); None if its id is taken."""
        if dict_id in self._list_dictionaries():
            return None
        key = layout.dict_key(time.time_ns() // 1000, dict_id, page_class)
        if not self.backend.put_if_absent(key, self._seal(Kind.DICT, key, raw)):
            return None
        self._dict_keys = None
        return self.dictionary(dict_id)

    @staticmethod
    def new_dictionary_id() -> int:
        # zstd reserves ids below 32768 and at or above 2**31 for registered dictionaries.
        return 32768 + int.from_bytes(os.urandom(4), "little") % (2**31 - 32768)

    def _locate(self, block_id: bytes) -> Location:
        loc = self.index.get(block_id)
        if loc is None:
            raise IntegrityError(f"block {block_id.hex()} is missing from the repository index")
        return loc

    def _get_range(self, pack: str, offset: int, length: int) -> bytes:
        try:
            data = self.backend.get_range(layout.pack_key(pack), offset, length)
        except ObjectNotFound:
            raise IntegrityError(f"pack {pack} is missing from the repository") from None
        if len(data) != length:
            raise IntegrityError(f"pack {pack} is truncated")
        return data

    def _open_block(self, block_id: bytes, sealed: bytes | memoryview, rehash: bool) -> bytes:
        data = envelope.open_(self.keys, sealed, block_id, Kind.BLOCK, self.dictionary)
        if rehash and self.keys.block_id(data) != block_id:
            raise IntegrityError(f"block {block_id.hex()} content does not match its id")
        return data

    def read_block(self, block_id: bytes, *, rehash: bool = True) -> bytes:
        loc = self._locate(block_id)
        return self._open_block(block_id, self._get_range(loc.pack, loc.offset, loc.length), rehash)

    # Plaintext opened per native call: 2 MiB (256 blocks of 8 KiB). A reading thread then holds
    # one ranged read (at most max_read stored bytes) and one such chunk, whatever the file size.
    CHUNK_BYTES = 2 << 20

    def locate(self, ids: bytes | bytearray | memoryview) -> bytearray:
        """REF records (index.RECORD) of concatenated block ids; IntegrityError if one is missing."""
        refs, missing = self.index.locate_many(ids)
        if missing:
            raise IntegrityError(f"block {_first_missing(refs).hex()} is missing from the repository index")
        return refs

    def read_chunks(
        self, ids: bytes | bytearray | memoryview, block_size: int, *, max_read: int = 8 << 20
    ) -> Iterator[tuple[bytes, bytes, bytearray, int]]:
        """Open the blocks of concatenated ids in order: yields (plaintexts of up to CHUNK_BYTES,
        their spans (u64 each), the REF records, the first record's number).

        Blocks that lie back to back in one pack (a file's usually do) come from one ranged
        read of up to max_read bytes; every envelope of a chunk is authenticated (AEAD tag or
        xxh3-128, bound to its block id) and decompressed in one native call without the GIL,
        so restore threads run on both cores (per-block Python was ~15% of a restore, and the
        GIL serialised decompression)."""
        view = memoryview(ids)
        step = self.LOCATE_IDS * ID_SIZE
        for pos in range(0, len(view), step):
            yield from self._read_located(self.locate(view[pos : pos + step]), block_size, max_read)

    # Ids located per index call: 8192 (384 KiB of REF records), so a 1 GiB file (131072 blocks
    # of 8 KiB) does not hold 6 MiB of records per reading thread.
    LOCATE_IDS = 8192

    def _read_located(
        self, refs: bytearray, block_size: int, max_read: int
    ) -> Iterator[tuple[bytes, bytes, bytearray, int]]:
        count = len(refs) // RECORD.size
        per_chunk = max(1, self.CHUNK_BYTES // max(1, block_size))
        key = self.keys.data_key
        index = self.index
        for start, end in _accel.refs_runs(refs, 0, count, max_read, 0, count or 1):
            _, offset, _, pno = RECORD.unpack_from(refs, start * RECORD.size)
            _, last_offset, last_length, _ = RECORD.unpack_from(refs, (end - 1) * RECORD.size)
            pack = index.pack_name(pno)
            data = self._get_range(pack, offset, last_offset + last_length - offset)
            for first in range(start, end, per_chunk):
                n = min(per_chunk, end - first)
                out, spans, faults = _accel.open_blocks(
                    data, offset, refs, first, n, key, Kind.BLOCK, self.dictionary, True
                )
                if faults:
                    number, message = faults[0]
                    block_id = bytes(refs[number * RECORD.size : number * RECORD.size + 32])
                    raise IntegrityError(f"block {block_id.hex()} in pack {pack}: {message}")
                assert out is not None and spans is not None
                if self.on_read is not None:
                    self.on_read(len(out))
                yield out, spans, refs, first

    def read_file(self, ids: bytes | bytearray | memoryview, block_size: int) -> Iterator[bytes]:
        """A file's content from its concatenated block ids, in chunks of up to CHUNK_BYTES."""
        for out, _, _, _ in self.read_chunks(ids, block_size):
            yield out

    def read_blocks(self, block_ids: list[bytes], *, rehash: bool = False, max_read: int = 8 << 20) -> Iterator[bytes]:
        """Blocks in order (see read_chunks). rehash=False trusts the envelope (authenticated,
        or checksummed, and bound to the block id) instead of recomputing the content id;
        verify recomputes it."""
        for out, spans, refs, first in self.read_chunks(b"".join(block_ids), self.settings.block_size, max_read=max_read):
            view = memoryview(out)
            pos = 0
            for k, span in enumerate(_SPANS.iter_unpack(spans)):
                block = bytes(view[pos : pos + span[0]])
                pos += span[0]
                if rehash:
                    block_id = bytes(refs[(first + k) * RECORD.size : (first + k) * RECORD.size + 32])
                    if self.keys.block_id(block) != block_id:
                        raise IntegrityError(f"block {block_id.hex()} content does not match its id")
                yield block

    def file_ids(self, entry: FileEntry) -> bytes:
        """The concatenated 32-byte ids of a file's blocks (32 bytes a block, no objects)."""
        if entry.blocks is not None:
            return b"".join(bytes.fromhex(b) for b in entry.blocks)
        if entry.blocklist is None:
            return b""
        raw = self.read_block(bytes.fromhex(entry.blocklist))
        if entry.blocklist_base is None:
            if len(raw) % 32:
                raise IntegrityError("block list is truncated")
            return raw
        return apply_delta_ids(self.read_block(bytes.fromhex(entry.blocklist_base)), raw)

    def file_block_ids(self, entry: FileEntry) -> list[bytes]:
        return split_ids(self.file_ids(entry))

    # -- WAL ------------------------------------------------------------------------------

    def put_wal(self, stanza: str, name: str, data: bytes, codec: codecs.Codec, level: int | None) -> bool:
        """Archive one WAL file. True if stored, False if the identical file was already there.

        A different file under an existing name is an error: the archive never overwrites.
        """
        key = layout.wal_key(stanza, name)
        sealed = envelope.seal(self.keys, Kind.WAL, data, key.encode(), codec, level)
        if self.backend.put_if_absent(key, sealed):
            return True
        try:
            existing = self.get_wal(stanza, name)
        except IntegrityError:
            raise WalError(f"WAL file {name} already exists in the repository and is unreadable: investigate before archiving again") from None
        if existing == data:
            return False
        raise WalError(f"WAL file {name} already exists in the repository with different content: refusing to overwrite")

    def get_wal(self, stanza: str, name: str) -> bytes:
        key = layout.wal_key(stanza, name)
        try:
            return self._get_sealed(Kind.WAL, key)
        except ObjectNotFound:
            raise WalNotFoundError(f"WAL file {name} is not in the repository") from None

    def authenticate_wal(self, stanza: str, name: str) -> None:
        """Check a WAL object's tag or checksum over its stored bytes, without decompressing it
        (verify: any change to what is stored fails here)."""
        key = layout.wal_key(stanza, name)
        try:
            envelope.authenticate(self.keys, self.backend.get(key), key.encode(), Kind.WAL)
        except ObjectNotFound:
            raise WalNotFoundError(f"WAL file {name} is not in the repository") from None

    def has_wal(self, stanza: str, name: str) -> bool:
        return self.backend.stat(layout.wal_key(stanza, name)) is not None

    def list_wal(self, stanza: str) -> list[str]:
        return [info.key.rsplit("/", 1)[1] for info in self.backend.list(layout.wal_prefix(stanza))]

    def delete_wal(self, stanza: str, name: str) -> None:
        self.backend.delete(layout.wal_key(stanza, name))

    # -- operations: per-pack index, small sealed JSON objects (locks, pins, reports) ------

    def pack_index_bodies(
        self,
        on_error: Callable[[str, PgvaultError], None] | None = None,
        *,
        map_: Callable[..., Iterator[Any]] = map,
        before_index: Callable[[dict[str, memoryview]], None] | None = None,
    ) -> dict[str, memoryview]:
        """pack_indexes with each pack's entries left encoded (index.ENTRY records): no Python
        object per block (verify). map_: reads the index objects (a thread pool's map reads them
        in parallel); before_index: gets the bodies before the index is built from them (verify
        starts checking packs meanwhile)."""

        def read(key: str) -> tuple[str, memoryview] | PgvaultError | None:
            try:
                return decode_body(self._get_sealed(Kind.INDEX, key))
            except ObjectNotFound:
                return None  # deleted since the listing
            except PgvaultError as exc:
                return exc

        keys = [info.key for info in self.backend.list("index/")]
        packs: dict[str, memoryview] = {}
        for key, result in zip(keys, map_(read, keys)):
            if isinstance(result, PgvaultError):
                if on_error is None:
                    raise result
                on_error(key, result)
            elif result is not None:
                packs[result[0]] = result[1]
        if before_index is not None:
            before_index(packs)
        index = Index()
        index.load(packs.items())
        self._index = index
        return packs

    def pack_indexes(
        self, on_error: Callable[[str, PgvaultError], None] | None = None
    ) -> dict[str, list[tuple[bytes, int, int]]]:
        """Every index object as pack name -> entries, and the merged index rebuilt from them
        (verify and GC need both, and each index object is then read once). on_error: report
        an unreadable index object and go on (verify) instead of raising (GC)."""
        return {
            pack: unpack_entries(body) for pack, body in self.pack_index_bodies(on_error).items()
        }

    def forget_index(self) -> None:
        """Drop the cached index, so the next use reloads it from the backend."""
        self._index = None

    def put_json(self, kind: Kind, key: str, doc: dict[str, Any], *, if_absent: bool = False) -> bool:
        sealed = self._seal(kind, key, json.dumps(doc, sort_keys=True).encode())
        if if_absent:
            return self.backend.put_if_absent(key, sealed)
        self.backend.put(key, sealed)
        return True

    def get_json(self, kind: Kind, key: str) -> dict[str, Any]:
        """ObjectNotFound if absent; IntegrityError if it does not open."""
        try:
            doc = json.loads(self._get_sealed(kind, key))
        except ValueError:
            raise IntegrityError(f"object {key} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise IntegrityError(f"object {key} is not a JSON object")
        return doc

    def delete_backup(self, stanza: str, backup_id: str) -> None:
        """Remove a backup's manifest: the backup is gone; GC later frees its blocks."""
        self.backend.delete(layout.manifest_key(stanza, backup_id))


# A delta block list (docs/FORMAT.md §8): the file's block count, then (position, id) pairs
# for the positions where it differs from its base block list.
DELTA_COUNT = struct.Struct("<Q")
DELTA_ITEM = struct.Struct("<I32s")


def split_ids(raw: bytes) -> list[bytes]:
    if len(raw) % 32:
        raise IntegrityError("block list is truncated")
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def encode_delta(base: bytes, ids: bytes) -> bytes:
    """The delta block list of ids (concatenated) against base (a plain block list)."""
    out = bytearray(DELTA_COUNT.pack(len(ids) // 32))
    for pos in _accel.changed_blocks(ids, base[: len(ids)], 32):
        out += DELTA_ITEM.pack(pos, ids[pos * 32 : pos * 32 + 32])
    return bytes(out)


def apply_delta_ids(base: bytes, delta: bytes) -> bytes:
    """apply_delta on concatenated ids: the same checks, 32 bytes a block instead of a list."""
    if len(base) % 32:
        raise IntegrityError("block list is truncated")
    if len(delta) < DELTA_COUNT.size or (len(delta) - DELTA_COUNT.size) % DELTA_ITEM.size:
        raise IntegrityError("delta block list is truncated")
    (count,) = DELTA_COUNT.unpack_from(delta)
    if count > (1 << 40):
        raise IntegrityError("delta block list names an impossible block count")
    have = min(count, len(base) // 32)
    ids = bytearray(base[: have * 32]) + bytearray((count - have) * 32)
    named = bytearray(count - have)  # which positions past the base's end the delta names
    for pos, block_id in DELTA_ITEM.iter_unpack(memoryview(delta)[DELTA_COUNT.size :]):
        if pos >= count:
            raise IntegrityError("delta block list names a block beyond the file's end")
        ids[pos * 32 : pos * 32 + 32] = block_id
        if pos >= have:
            named[pos - have] = 1
    if named.count(0):
        raise IntegrityError("delta block list leaves blocks of the file unnamed")
    return bytes(ids)


def _first_missing(refs: bytearray) -> bytes:
    """The id of the first REF record with length 0 (a block the index lacks)."""
    k = memoryview(refs).cast("I")[10 :: RECORD.size // 4].tolist().index(0)
    return bytes(refs[k * RECORD.size : k * RECORD.size + ID_SIZE])


_SPANS = struct.Struct("<Q")


def apply_delta(base: list[bytes], delta: bytes) -> list[bytes]:
    if len(delta) < DELTA_COUNT.size or (len(delta) - DELTA_COUNT.size) % DELTA_ITEM.size:
        raise IntegrityError("delta block list is truncated")
    (count,) = DELTA_COUNT.unpack_from(delta)
    ids: list[bytes | None] = list(base[:count]) + [None] * (count - min(count, len(base)))
    for pos, block_id in DELTA_ITEM.iter_unpack(memoryview(delta)[DELTA_COUNT.size :]):
        if pos >= count:
            raise IntegrityError("delta block list names a block beyond the file's end")
        ids[pos] = block_id
    if None in ids:
        raise IntegrityError("delta block list leaves blocks of the file unnamed")
    return ids  # type: ignore[return-value]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
