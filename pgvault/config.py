"""Options, read once: command-line flag beats PGVAULT_* environment beats config file.

The config file is INI: a [global] section and one section per stanza (the stanza section
wins over [global]). This is the only module that reads the environment or the file.

Every command passes through here before it does anything, so the module stays cheap to import:
plain classes, not dataclasses (whose import pulls in inspect, ast and dis, and whose class
creation compiles methods for 50 fields: ~8 ms of each start together), configparser only when
a config file exists, and typing only for the type checker.
"""

from __future__ import annotations

import re

from pgvault.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping

DEFAULT_CONFIG = "/etc/pgvault/pgvault.conf"


def _int(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"option {name}: {text!r} is not a whole number") from None
        if not low <= value <= high:
            raise ConfigError(f"option {name}: {value} is out of range ({low} to {high})")
        return value

    return parse


def _choice(name: str, *choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ConfigError(f"option {name}: {text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _percent(name: str, zero: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.rstrip("%"))
        except ValueError:
            raise ConfigError(f"option {name}: {text!r} is not a percentage") from None
        if not (0 <= value if zero else 0 < value) or value > 100:
            raise ConfigError(f"option {name}: {value} is out of range ({'0' if zero else 'above 0'} to 100)")
        return value

    return parse


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(name: str) -> Callable[[str], int]:
    """'7d', '12h', '1d12h', '90m' -> seconds."""

    def parse(text: str) -> int:
        match = re.fullmatch(r"(?:\d+[smhdw])+", text.strip())
        if not match:
            raise ConfigError(f"option {name}: {text!r} is not a duration (like 7d, 12h, 1w, 1d12h)")
        return sum(int(n) * _DURATION_UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", text))

    return parse


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "y", "yes", "true", "on"):
        return True
    if text.lower() in ("0", "n", "no", "false", "off", ""):
        return False
    raise ConfigError(f"{text!r} is not a boolean (use y or n)")


class OptionSpec:
    """One option: its name, help, parser of a given value, and default."""

    __slots__ = ("default", "flag", "help", "metavar", "multi", "name", "parse")

    def __init__(
        self, name: str, help: str, parse: Callable[[str], Any] = str, default: Any = None,
        flag: bool = False,  # a switch without a value on the command line
        multi: bool = False,  # may be given several times (comma-separated in env/file)
        metavar: str | None = None,
    ) -> None:
        self.name = name
        self.help = help
        self.parse = parse
        self.default = default
        self.flag = flag
        self.multi = multi
        self.metavar = metavar

    def __repr__(self) -> str:
        return f"OptionSpec({self.name!r})"


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("config", "config file", default=DEFAULT_CONFIG, metavar="FILE"),
    OptionSpec("stanza", "the cluster being backed up", metavar="NAME"),
    OptionSpec("repo", "repository: /path, file:///path, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, azure://CONTAINER/PREFIX", metavar="URL"),
    OptionSpec("repo-endpoint", "object store endpoint URL (S3-compatible store, GCS API, Azure account URL)", metavar="URL"),
    OptionSpec("repo-region", "S3 region (default: the AWS SDK's)", metavar="REGION"),
    OptionSpec("repo-s3-path-style", "S3 path-style addressing (endpoint/bucket/key), for S3-compatible stores", _bool, False, flag=True),
    OptionSpec("repo-storage-class", "storage class of new objects (S3 StorageClass, GCS storage class, Azure tier)", metavar="CLASS"),
    OptionSpec("repo-s3-sse-kms-key-id", "S3 server-side encryption with this KMS key id (aws:kms)", metavar="KEY"),
    OptionSpec("repo-retry-timeout", "seconds an object-store request is retried before giving up", _int("repo-retry-timeout", 1, 86400), 180, metavar="S"),
    OptionSpec("pg-conninfo", "libpq connection string for backups", default="", metavar="STR"),
    OptionSpec("pg-data", "the cluster's data directory", metavar="DIR"),
    OptionSpec("passphrase-file", "file holding the repository passphrase", metavar="FILE"),
    OptionSpec("compress", "compression of new data", _choice("compress", "zstd", "lz4", "none"), "zstd"),
    OptionSpec("compress-level", "compression level", _int("compress-level", -7, 22), None, metavar="N"),
    OptionSpec("jobs", "parallel workers", _int("jobs", 1, 128), 2, metavar="N"),
    OptionSpec("log-level", "stderr log level", _choice("log-level", "error", "warn", "info", "debug"), "warn"),
    OptionSpec("output", "output format", _choice("output", "text", "json"), "text"),
    OptionSpec("progress", "progress display", _choice("progress", "auto", "always", "never"), "auto"),
    OptionSpec("archive-timeout", "seconds a backup waits for its WAL to be archived", _int("archive-timeout", 1, 86400), 60, metavar="S"),
    OptionSpec("block-size", "block size in KiB for a new repository (docs/FORMAT.md §4)", _int("block-size", 8, 16384), 8, metavar="KIB"),
    OptionSpec("type", "backup: full|incr; restore: default|immediate|time|xid|lsn|name|standby|none", metavar="TYPE"),
    OptionSpec("annotation", "backup annotation KEY=VALUE", multi=True, metavar="K=V"),
    OptionSpec("set", "backup to restore (an id, or latest)", default="latest", metavar="ID"),
    OptionSpec("target", "recovery target value", metavar="VALUE"),
    OptionSpec("target-action", "after reaching the target", _choice("target-action", "pause", "promote", "shutdown"), metavar="ACTION"),
    OptionSpec("target-timeline", "recovery target timeline", metavar="TLI"),
    OptionSpec("target-exclusive", "stop just before the target", _bool, False, flag=True),
    OptionSpec("force", "restore over a non-empty directory", _bool, False, flag=True),
    OptionSpec("delta", "restore over an existing directory, rewriting only what differs", _bool, False, flag=True),
    OptionSpec("tablespace-map", "restore tablespace OID into DIR", multi=True, metavar="OID=DIR"),
    OptionSpec("tablespace-map-all", "restore every tablespace under DIR/<oid>", metavar="DIR"),
    OptionSpec("archive-async", "wal-push/wal-fetch through a spool dir and a background worker", _bool, False, flag=True),
    OptionSpec("spool-path", "spool directory for --archive-async", default="/var/spool/pgvault", metavar="DIR"),
    OptionSpec("archive-get-queue-max", "MiB of WAL wal-fetch prefetches ahead (--archive-async)", _int("archive-get-queue-max", 16, 1 << 20), 256, metavar="MIB"),
    # Operations (verify, expire, gc, check, pin): docs in README "Operations".
    OptionSpec("lock-timeout", "seconds to wait for a conflicting repository lock (0: fail at once)", _int("lock-timeout", 0, 86400), 0, metavar="S"),
    OptionSpec("pack-size", "pack size in MiB for a new repository", _int("pack-size", 1, 1024), 32, metavar="MIB"),
    OptionSpec("sample", "verify: read this share of packs, chosen at random", _percent("sample"), metavar="PERCENT"),
    OptionSpec("rehash", "verify: also decompress every block and re-hash it against its id", _bool, False, flag=True),
    OptionSpec("metadata-only", "verify: check manifests, index and WAL listing; read no pack data", _bool, False, flag=True),
    OptionSpec("keep-last", "expire: keep the N newest backups", _int("keep-last", 1, 1000000), metavar="N"),
    OptionSpec("keep-within", "expire: keep backups started within DURATION (7d, 12h)", _duration("keep-within"), metavar="DURATION"),
    OptionSpec("keep-daily", "expire: keep the newest backup of each of the last N days with backups", _int("keep-daily", 1, 1000000), metavar="N"),
    OptionSpec("keep-weekly", "expire: keep the newest backup of each of the last N weeks with backups", _int("keep-weekly", 1, 1000000), metavar="N"),
    OptionSpec("keep-monthly", "expire: keep the newest backup of each of the last N months with backups", _int("keep-monthly", 1, 1000000), metavar="N"),
    OptionSpec("keep-wal-within", "expire: keep WAL for point-in-time recovery over DURATION only", _duration("keep-wal-within"), metavar="DURATION"),
    OptionSpec("dry-run", "expire, gc: show what would be removed, remove nothing", _bool, False, flag=True),
    OptionSpec("max-unused", "expire, gc: repack packs until unreferenced bytes are at most PERCENT of the repository", _percent("max-unused", zero=True), 10.0, metavar="PERCENT"),
)


class Options:
    """The resolved options of one run, read-only (resolve() builds it)."""

    command: str
    args: tuple[str, ...]
    config: str
    stanza: str | None
    repo: str | None
    repo_endpoint: str | None
    repo_region: str | None
    repo_s3_path_style: bool
    repo_storage_class: str | None
    repo_s3_sse_kms_key_id: str | None
    repo_retry_timeout: int
    pg_conninfo: str
    pg_data: str | None
    passphrase_file: str | None
    passphrase: bytes | None
    compress: str
    compress_level: int | None
    jobs: int
    log_level: str
    output: str
    progress: str
    archive_timeout: int
    block_size: int
    type: str | None
    annotation: tuple[str, ...]
    set: str
    target: str | None
    target_action: str | None
    target_timeline: str | None
    target_exclusive: bool
    force: bool
    delta: bool
    tablespace_map: tuple[str, ...]
    tablespace_map_all: str | None
    archive_async: bool
    spool_path: str
    archive_get_queue_max: int
    lock_timeout: int
    pack_size: int
    sample: float | None
    rehash: bool
    metadata_only: bool
    keep_last: int | None
    keep_within: int | None
    keep_daily: int | None
    keep_weekly: int | None
    keep_monthly: int | None
    keep_wal_within: int | None
    dry_run: bool
    max_unused: float
    # Options given explicitly (flag, environment or file), for commands whose default differs
    # from the shared one (verify checks every backup unless --set is given).
    given: frozenset[str]
    # The Azure credential variables (its SDK does not read them itself); never shown.
    azure_env: Mapping[str, str]

    def __init__(self, **values: Any) -> None:
        values.setdefault("given", frozenset())
        values.setdefault("azure_env", {})
        missing = [name for name in _FIELDS if name not in values]
        unknown = [name for name in values if name not in _FIELDS]
        if missing or unknown:
            raise TypeError(f"Options: missing {missing}, unknown {unknown}")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Options are read-only: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Options are read-only: cannot delete {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Options):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _FIELDS)

    __hash__ = None  # type: ignore[assignment]  # azure_env is a dict

    def __repr__(self) -> str:  # the passphrase and the Azure credentials are never shown
        shown = (f"{name}={getattr(self, name)!r}" for name in _FIELDS if name not in _SECRET)
        return f"Options({', '.join(shown)})"

    def require_stanza(self) -> str:
        if not self.stanza:
            raise ConfigError(f"{self.command} needs --stanza (or PGVAULT_STANZA, or stanza in the config file)")
        return self.stanza

    def require_repo(self) -> str:
        if not self.repo:
            raise ConfigError(f"{self.command} needs --repo (or PGVAULT_REPO, or repo in the config file)")
        return self.repo


# Options' attributes, in order (its annotations); the _SECRET ones are left out of its repr.
_FIELDS = tuple(Options.__annotations__)
_SECRET = ("passphrase", "azure_env")


def _env_name(name: str) -> str:
    return "PGVAULT_" + name.upper().replace("-", "_")


def _read_file(path: str, stanza: str | None, explicit: bool) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable") from None
    import configparser  # only when there is a file to read

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(f"config file {path} is malformed: {str(exc).splitlines()[0]}") from None
    values: dict[str, str] = {}
    if parser.has_section("global"):
        values.update(parser.items("global"))
    if stanza and parser.has_section(stanza):
        values.update(parser.items(stanza))
    known = {spec.name for spec in OPTIONS}
    for key in values:
        if key not in known:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
    return values


def resolve(command: str, args: tuple[str, ...], cli: Mapping[str, Any], environ: Mapping[str, str]) -> Options:
    """Merge flags, environment and file into Options."""
    config_path = cli.get("config") or environ.get("PGVAULT_CONFIG")
    explicit = config_path is not None
    stanza = cli.get("stanza") or environ.get("PGVAULT_STANZA")
    file_values = _read_file(config_path or DEFAULT_CONFIG, stanza, explicit)
    values: dict[str, Any] = {}
    given: set[str] = set()
    for spec in OPTIONS:
        attr = spec.name.replace("-", "_")
        raw: Any = cli.get(spec.name)
        if raw is None:
            raw = environ.get(_env_name(spec.name))
            if raw is not None and spec.multi:
                raw = [part for part in raw.split(",") if part]
        if raw is None:
            raw = file_values.get(spec.name)
            if raw is not None and spec.multi:
                raw = [part.strip() for part in raw.split(",") if part.strip()]
        if raw is not None:
            given.add(spec.name)
        if raw is None:
            value = spec.default
        elif spec.multi:
            value = tuple(raw)
        elif spec.flag:
            value = _bool(raw)
        else:
            value = spec.parse(raw)
        if spec.multi and value is None:
            value = ()
        values[attr] = value
    values["config"] = config_path or DEFAULT_CONFIG
    values["passphrase"] = _passphrase(values["passphrase_file"], environ)
    values["azure_env"] = {name: environ[name] for name in AZURE_ENV if environ.get(name)}
    return Options(command=command, args=args, given=frozenset(given), **values)


AZURE_ENV = ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")


def repo_option_args(opts: Options) -> list[str]:
    """The repo-* options that differ from their defaults, as flags: what a command that
    pgvault writes for later (restore_command) needs to reach the same repository."""
    args = []
    for spec in OPTIONS:
        if not spec.name.startswith("repo-"):
            continue
        value = getattr(opts, spec.name.replace("-", "_"))
        if value == spec.default or value is None:
            continue
        args.append(f"--{spec.name}" if spec.flag else f"--{spec.name}={value}")
    return args


def _passphrase(path: str | None, environ: Mapping[str, str]) -> bytes | None:
    if path:
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {path}: {exc.strerror}") from None
        text = text.rstrip(b"\r\n")
        if not text:
            raise ConfigError(f"passphrase file {path} is empty")
        return text
    env = environ.get("PGVAULT_PASSPHRASE")
    return env.encode() if env else None
