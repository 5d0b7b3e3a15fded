"""open_blocks' fault messages, shared by the native module and its pure twin.

A module of its own so the native module can read them without importing pgvault._pure
(xxhash, functools, typing: milliseconds of every pgvault start).
"""

# By status (the native code reports the same numbers). The envelope's own wording
# (pipeline/envelope.py) where it has one; {0} is the number the fault names, {1} the
# expected kind.
FAULT_MESSAGES = (
    "",
    "pack is truncated",  # the object lies beyond the end of the data read
    "object is truncated",
    "object has a bad magic number (not a pgvault object)",
    "object format version {0} is not supported by this pgvault",
    "object is a {0}, expected {1}",
    "object is encrypted but the repository is not",
    "unencrypted object in an encrypted repository",
    "object checksum mismatch (corrupted)",
    "object failed authentication (corrupted or tampered)",
    "object uses unknown key id {0}",
    "object uses unknown codec id {0}",
    "object failed to decompress",
    "object decompressed to the wrong length",
    "object has a bad zstd frame header",
    "object needs compression dictionary {0:08x}, which is not available here",
)
