"""Object keys: the one place that knows where things live (docs/FORMAT.md §1)."""

from __future__ import annotations

import re

from pgvault.errors import ConfigError

CONFIG = "config"
STANZA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_stanza(name: str) -> str:
    if not STANZA_RE.match(name):
        raise ConfigError(f"invalid stanza name {name!r}: use letters, digits, '_', '-', '.'")
    return name


def pack_key(pack: str) -> str:
    return f"packs/{pack[:2]}/{pack}"


def index_key(pack: str) -> str:
    return f"index/{pack}"


def stanza_key(stanza: str) -> str:
    return f"stanzas/{stanza}/stanza"


def manifest_prefix(stanza: str) -> str:
    return f"stanzas/{stanza}/backups/"


def manifest_key(stanza: str, backup_id: str) -> str:
    return f"{manifest_prefix(stanza)}{backup_id}.manifest"


def wal_prefix(stanza: str) -> str:
    return f"stanzas/{stanza}/wal/"


def wal_key(stanza: str, name: str) -> str:
    """Segments, .partial and .backup files are grouped by their first 16 characters
    (timeline + log id) so a timeline's range lists cheaply; .history files sit together."""
    group = "history" if name.endswith(".history") else name[:16]
    return f"{wal_prefix(stanza)}{group}/{name}"


LOCK_PREFIX = "locks/"


def lock_key(name: str) -> str:
    return f"{LOCK_PREFIX}{name}"


def pin_prefix(stanza: str) -> str:
    return f"stanzas/{stanza}/pins/"


def pin_key(stanza: str, backup_id: str) -> str:
    return f"{pin_prefix(stanza)}{backup_id}.pin"


def verify_key(stanza: str) -> str:
    """The result of the last verify of a stanza (overwritten by each run)."""
    return f"stanzas/{stanza}/verify"


DICT_PREFIX = "dicts/"


def dict_key(created_us: int, dict_id: int, page_class: str = "") -> str:
    """A compression dictionary (docs/FORMAT.md §4a): creation time (Unix microseconds) first,
    so a listing is oldest to newest, then the page class it is for (omitted for the general
    class, as in keys written before classes existed), then the 32-bit id its zstd frames name."""
    middle = f"{page_class}-" if page_class else ""
    return f"{DICT_PREFIX}{created_us:016d}-{middle}{dict_id:08x}"


def dict_class(key: str) -> str:
    """The page class of a dict_key ("" for the general class)."""
    parts = key[len(DICT_PREFIX) :].split("-")
    return parts[1] if len(parts) == 3 else ""
