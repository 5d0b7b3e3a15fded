"""Keys and authenticated encryption.

A random 32-byte data key encrypts objects with XChaCha20-Poly1305 (random 24-byte nonce,
so no nonce bookkeeping across hosts). A second random 32-byte id key makes block ids keyed
BLAKE3 hashes, so ids reveal nothing about content. Both are wrapped by a key derived from
the passphrase with Argon2id, so a passphrase change rewrites one small object.

PyNaCl (9 ms) and blake3 are imported on first use: wal-push runs once per WAL segment and,
for an unencrypted repository, needs neither. The sizes and KDF limits below are libsodium's
constants written out (tests/unit/test_envelope.py checks them against PyNaCl).
"""

from __future__ import annotations

import base64
import os
from typing import Any, Callable

from pgvault.errors import IntegrityError, PassphraseError

NONCE_SIZE = 24  # crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE = 16  # crypto_aead_xchacha20poly1305_ietf_ABYTES
SALT_SIZE = 16  # crypto_pwhash_argon2id_SALTBYTES
_WRAP_AAD = b"pgvault-keys-v1"

# Argon2id cost. wal-push derives the key once per segment, so this is a start-up cost on
# the archiving path: 64 MiB / 2 passes (libsodium's "interactive") is ~0.1 s here. The
# parameters are stored in the repository config, so a later default does not break old repos.
KDF_OPSLIMIT = 2  # crypto_pwhash_argon2id_OPSLIMIT_INTERACTIVE
KDF_MEMLIMIT = 64 << 20  # crypto_pwhash_argon2id_MEMLIMIT_INTERACTIVE

_blake3: Callable[..., Any] | None = None
_sodium: Any = None  # nacl.bindings once loaded; seal/unseal run per block, so cached


def _bindings() -> Any:
    global _sodium
    if _sodium is None:
        from nacl import bindings

        _sodium = bindings
    return _sodium


def _crypto_error() -> type[Exception]:
    from nacl.exceptions import CryptoError  # only evaluated when decryption failed

    return CryptoError


def _blake3_keyed(data: bytes | memoryview, key: bytes) -> bytes:
    global _blake3
    if _blake3 is None:
        from blake3 import blake3

        _blake3 = blake3
    return _blake3(data, key=key).digest()  # type: ignore[no-any-return]


class Keys:
    """The repository's secrets: data_key is None in an unencrypted repository. Immutable.

    A plain class rather than a frozen dataclass: importing dataclasses costs 9 ms, which
    wal-push would pay for every segment.
    """

    __slots__ = ("data_key", "id_key")
    data_key: bytes | None
    id_key: bytes

    def __init__(self, data_key: bytes | None, id_key: bytes) -> None:
        object.__setattr__(self, "data_key", data_key)
        object.__setattr__(self, "id_key", id_key)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Keys.{name} is read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keys) and (self.data_key, self.id_key) == (other.data_key, other.id_key)

    def __hash__(self) -> int:
        return hash((self.data_key, self.id_key))

    def __repr__(self) -> str:
        return f"Keys(encrypted={self.encrypted})"  # never the secrets

    def __reduce__(self) -> tuple[type[Keys], tuple[bytes | None, bytes]]:
        return Keys, (self.data_key, self.id_key)

    def block_id(self, data: bytes | memoryview) -> bytes:
        """Content id of a block: keyed BLAKE3 (2.5-3 GB/s here, 4x keyed BLAKE2b)."""
        return _blake3_keyed(data, self.id_key)

    @property
    def encrypted(self) -> bool:
        return self.data_key is not None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def new_keys(passphrase: bytes | None) -> tuple[Keys, dict[str, object]]:
    """Fresh keys and the JSON-able description to store in the repository config."""
    id_key = os.urandom(32)
    if passphrase is None:
        return Keys(None, id_key), {"encryption": "none", "id_key": _b64(id_key)}
    data_key = os.urandom(32)
    salt = os.urandom(SALT_SIZE)
    kek = _derive(passphrase, salt, KDF_OPSLIMIT, KDF_MEMLIMIT)
    nonce = os.urandom(NONCE_SIZE)
    wrapped = _bindings().crypto_aead_xchacha20poly1305_ietf_encrypt(data_key + id_key, _WRAP_AAD, nonce, kek)
    desc: dict[str, object] = {
        "encryption": "xchacha20-poly1305",
        "kdf": {"alg": "argon2id", "opslimit": KDF_OPSLIMIT, "memlimit": KDF_MEMLIMIT, "salt": _b64(salt)},
        "wrapped_keys": _b64(nonce + wrapped),
    }
    return Keys(data_key, id_key), desc


def _derive(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    from nacl import pwhash

    return pwhash.argon2id.kdf(32, passphrase, salt, opslimit=opslimit, memlimit=memlimit)


def open_keys(desc: dict[str, object], passphrase: bytes | None) -> Keys:
    """Unwrap the keys described in the repository config."""
    if desc.get("encryption") == "none":
        return Keys(None, _unb64(str(desc["id_key"])))
    if passphrase is None:
        raise PassphraseError("the repository is encrypted: give --passphrase-file or PGVAULT_PASSPHRASE")
    kdf = desc["kdf"]
    assert isinstance(kdf, dict)
    kek = _derive(passphrase, _unb64(kdf["salt"]), int(kdf["opslimit"]), int(kdf["memlimit"]))
    blob = _unb64(str(desc["wrapped_keys"]))
    try:
        keys = _bindings().crypto_aead_xchacha20poly1305_ietf_decrypt(blob[NONCE_SIZE:], _WRAP_AAD, blob[:NONCE_SIZE], kek)
    except _crypto_error():
        raise PassphraseError("wrong passphrase for this repository") from None
    return Keys(keys[:32], keys[32:64])


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + _bindings().crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def unseal(key: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes:
    sealed = bytes(sealed)
    try:
        return _bindings().crypto_aead_xchacha20poly1305_ietf_decrypt(sealed[NONCE_SIZE:], aad, sealed[:NONCE_SIZE], key)  # type: ignore[no-any-return]
    except _crypto_error():
        raise IntegrityError("object failed authentication (corrupted or tampered)") from None
