"""Synchronous wal-push to a filesystem repository, with the fewest imports.

archive_command starts a process for every 16 MiB WAL segment and PostgreSQL waits for it, so
start-up is most of the cost: the full command line imports argparse, the Options dataclass and
the whole repository stack (index, manifests, the native module) before it reads one byte,
about 85 ms against 15 ms of real work. This path settles the common call with os, json, the
envelope and the codecs only: it resolves the options wal-push reads exactly as config.py
does (flag > PGVAULT_* environment > config file, the stanza's section over [global]), reads
the repository config and the stanza, checks the segment and stores it with the same envelope
and the same durable put-if-absent as the full path.

Whatever it cannot settle for certain returns None before anything is written, and the full
command line then runs from the start and reports it: an option it does not parse itself
(abbreviated, repeated, multi-valued, a percentage or duration), a value it would reject, a
config file it cannot read, a repository that is not a local path, an unknown stanza, a segment
that fails its checks, or a segment already archived (the full path compares the contents).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

DEFAULT_CONFIG = "/etc/pgvault/pgvault.conf"  # config.DEFAULT_CONFIG
_TRUE = ("1", "y", "yes", "true", "on")
_FALSE = ("0", "n", "no", "false", "off", "")


class _Unsettled(Exception):
    """This call needs the full command line."""


def _int(low: int, high: int) -> Callable[[str], object]:
    def parse(text: str) -> object:
        value = int(text)  # ValueError: the full path words the error
        if not low <= value <= high:
            raise _Unsettled
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if text not in choices:
            raise _Unsettled
        return text

    return parse


def _bool(text: str | bool) -> object:
    if text is True:
        return True
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise _Unsettled


def _str(text: str) -> object:
    return text


# Every option of config.OPTIONS that this path parses, with config.py's checks (the unit
# tests hold the two tables in step). "flag" options take no value on the command line. Any
# option given that is not here (multi-valued, percentages, durations) sends the call on.
_FLAGS = frozenset(
    ("repo-s3-path-style", "target-exclusive", "force", "delta", "archive-async", "rehash", "metadata-only", "dry-run")
)
PARSERS: dict[str, Callable[[str], object]] = {
    **{name: _bool for name in _FLAGS},
    **{
        name: _str
        for name in (
            "config", "stanza", "repo", "repo-endpoint", "repo-region", "repo-storage-class",
            "repo-s3-sse-kms-key-id", "pg-conninfo", "pg-data", "passphrase-file", "type", "set",
            "target", "target-timeline", "tablespace-map-all", "spool-path",
        )
    },
    "repo-retry-timeout": _int(1, 86400),
    "compress": _choice("zstd", "lz4", "none"),
    "compress-level": _int(-7, 22),
    "jobs": _int(1, 128),
    "log-level": _choice("error", "warn", "info", "debug"),
    "output": _choice("text", "json"),
    "progress": _choice("auto", "always", "never"),
    "archive-timeout": _int(1, 86400),
    "block-size": _int(8, 16384),
    "target-action": _choice("pause", "promote", "shutdown"),
    "archive-get-queue-max": _int(16, 1 << 20),
    "lock-timeout": _int(0, 86400),
    "pack-size": _int(1, 1024),
    "keep-last": _int(1, 1000000),
    "keep-daily": _int(1, 1000000),
    "keep-weekly": _int(1, 1000000),
    "keep-monthly": _int(1, 1000000),
}
# The other options config.py knows: given anywhere, they send the call to the full path.
OTHERS = frozenset(("annotation", "tablespace-map", "sample", "keep-within", "keep-wal-within", "max-unused"))


def _env_name(name: str) -> str:
    return "PGVAULT_" + name.upper().replace("-", "_")


def _command_line(args: list[str]) -> tuple[dict[str, object], list[str]]:
    """Options and positional words, as argparse would read them, or _Unsettled."""
    given: dict[str, object] = {}
    words: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-"):
            words.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or name not in PARSERS or name in given:
            raise _Unsettled  # -h, --help, --version, an abbreviation, a repeat, '--', unknown
        if name in _FLAGS:
            if eq:
                raise _Unsettled
            given[name] = True
            continue
        if not eq:
            if i == len(args) or args[i].startswith("-"):
                raise _Unsettled
            value = args[i]
            i += 1
        given[name] = value
    return given, words


def _config_file(path: str, stanza: str | None, explicit: bool) -> dict[str, str]:
    """config._read_file, or _Unsettled for anything but a readable, well-formed file."""
    if not explicit and not os.path.lexists(path):
        return {}
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    with open(path, encoding="utf-8") as f:  # OSError, configparser.Error: the full path words it
        parser.read_file(f)
    values: dict[str, str] = {}
    if parser.has_section("global"):
        values.update(parser.items("global"))
    if stanza and parser.has_section(stanza):
        values.update(parser.items(stanza))
    return values


def resolve(args: list[str], environ: Mapping[str, str]) -> tuple[dict[str, object], list[str]]:
    """(option values by name, positional words) as config.resolve would give them for the
    options that are set; _Unsettled when only the full path can say."""
    cli, words = _command_line(args)
    config_path = cli.get("config") or environ.get("PGVAULT_CONFIG")
    stanza = cli.get("stanza") or environ.get("PGVAULT_STANZA")
    file_values = _config_file(str(config_path or DEFAULT_CONFIG), str(stanza) if stanza else None, config_path is not None)
    values: dict[str, object] = {}
    for name in OTHERS:
        if environ.get(_env_name(name)) is not None or name in file_values:
            raise _Unsettled
    for key in file_values:
        if key not in PARSERS and key not in OTHERS:
            raise _Unsettled  # an unknown option: config.py's error
    for name, parse in PARSERS.items():
        raw = cli.get(name)
        if raw is None:
            raw = environ.get(_env_name(name))
        if raw is None:
            raw = file_values.get(name)
        if raw is None:
            continue
        if raw == "":
            raise _Unsettled  # empty values have corner cases (an empty PGVAULT_CONFIG ...)
        values[name] = parse(raw)  # type: ignore[arg-type]
    values.setdefault("config", config_path or DEFAULT_CONFIG)
    return values, words


def _passphrase(values: Mapping[str, object], environ: Mapping[str, str]) -> bytes | None:
    path = values.get("passphrase-file")
    if path:
        with open(str(path), "rb") as f:
            text = f.read().rstrip(b"\r\n")
        if not text:
            raise _Unsettled
        return text
    env = environ.get("PGVAULT_PASSPHRASE")
    return env.encode() if env else None


def push(args: list[str], environ: Mapping[str, str]) -> bool:
    """True once the segment is durable in the repository; _Unsettled (or any other
    exception) before anything was written when the full path must run instead."""
    values, words = resolve(args, environ)
    if len(words) != 2 or words[0] != "wal-push" or values.get("archive-async"):
        raise _Unsettled
    repo, stanza = values.get("repo"), values.get("stanza")
    if not isinstance(repo, str) or not repo.startswith("/") or "://" in repo or not isinstance(stanza, str):
        raise _Unsettled  # object stores and file:// URLs take the full path
    passphrase = _passphrase(values, environ)

    import json

    from pgvault import durable
    from pgvault.ops.wal import check_wal_file, read_wal_file
    from pgvault.pg import wal
    from pgvault.pipeline import codecs, crypto, envelope
    from pgvault.repository import layout

    path = words[1]
    pg_data = values.get("pg-data")
    if not os.path.isabs(path) and pg_data:
        path = os.path.join(str(pg_data), path)
    path = os.path.join(os.getcwd(), path)
    name = os.path.basename(path)
    wal.wal_file_kind(name)  # ValueError: not a WAL file name

    def read(key: str) -> bytes:
        with open(os.path.join(repo, key), "rb") as f:
            return f.read()

    doc = json.loads(read(layout.CONFIG))
    if doc.get("format") != 1:  # repository.REPO_FORMAT
        raise _Unsettled
    keys = crypto.open_keys(doc["keys"], passphrase)
    stanza_key = layout.stanza_key(layout.check_stanza(stanza))
    info = json.loads(envelope.open_(keys, read(stanza_key), stanza_key.encode(), envelope.Kind.STANZA))
    data = read_wal_file(path)
    check_wal_file(name, data, info["stanza"], info["system_id"], info["wal_segment_size"])
    key = layout.wal_key(stanza, name)
    codec = codecs.codec_by_name(str(values.get("compress", "zstd")))
    level = values.get("compress-level")
    sealed = envelope.seal(keys, envelope.Kind.WAL, data, key.encode(), codec, level if isinstance(level, int) else None)
    if not durable.write_new(os.path.join(repo, key), sealed):
        raise _Unsettled  # already archived: the full path compares the two
    return True
