from __future__ import annotations

import os

import pytest

from pgvault.errors import IntegrityError, PassphraseError
from pgvault.pipeline import codecs, crypto, envelope
from pgvault.pipeline.envelope import Kind


@pytest.fixture(params=["plain", "encrypted"])
def keys(request: pytest.FixtureRequest) -> crypto.Keys:
    passphrase = None if request.param == "plain" else b"correct horse"
    keys, desc = crypto.new_keys(passphrase)
    assert crypto.open_keys(desc, passphrase) == keys
    return keys


@pytest.mark.parametrize("codec", list(codecs.Codec))
@pytest.mark.parametrize("data", [b"", b"a" * 100000, os.urandom(70000)])
def test_roundtrip(keys: crypto.Keys, codec: codecs.Codec, data: bytes) -> None:
    sealed = envelope.seal(keys, Kind.BLOCK, data, b"ctx", codec)
    assert envelope.open_(keys, sealed, b"ctx", Kind.BLOCK) == data


def test_incompressible_is_stored_raw(keys: crypto.Keys) -> None:
    data = os.urandom(65536)
    sealed = envelope.seal(keys, Kind.BLOCK, data, b"", codecs.Codec.ZSTD)
    assert sealed[6] == codecs.Codec.NONE
    assert len(sealed) < len(data) + 64


def test_every_flipped_byte_is_detected(keys: crypto.Keys) -> None:
    sealed = envelope.seal(keys, Kind.WAL, b"x" * 5000 + os.urandom(100), b"name", codecs.Codec.ZSTD)
    for pos in range(0, len(sealed), max(1, len(sealed) // 97)):
        broken = bytearray(sealed)
        broken[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            envelope.open_(keys, bytes(broken), b"name", Kind.WAL)


def test_context_binds_object_to_its_name(keys: crypto.Keys) -> None:
    sealed = envelope.seal(keys, Kind.WAL, b"segment", b"stanzas/a/wal/1", codecs.Codec.LZ4)
    with pytest.raises(IntegrityError):
        envelope.open_(keys, sealed, b"stanzas/a/wal/2", Kind.WAL)
    with pytest.raises(IntegrityError):
        envelope.open_(keys, sealed, b"stanzas/a/wal/1", Kind.MANIFEST)


def test_wrong_passphrase() -> None:
    _, desc = crypto.new_keys(b"right")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        crypto.open_keys(desc, b"wrong")
    with pytest.raises(PassphraseError, match="encrypted"):
        crypto.open_keys(desc, None)


def test_block_ids_are_keyed() -> None:
    a, _ = crypto.new_keys(None)
    b, _ = crypto.new_keys(None)
    assert a.block_id(b"same") != b.block_id(b"same")
    assert a.block_id(b"same") == a.block_id(b"same")
