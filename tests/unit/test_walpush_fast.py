"""The minimal-import wal-push path (pgvault/_walpush.py) against the full command line.

The fast path must give the same result for the same call, with the same option precedence
(flag > PGVAULT_* environment > config file, the stanza's section over [global]), and must hand
every call it cannot settle to the full command line, which refuses bad input with one line.
The repositories are real filesystem repositories; each call is a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgvault import _walpush
from pgvault.backends.fs import FsBackend
from pgvault.config import OPTIONS, resolve
from pgvault.errors import ConfigError
from pgvault.pipeline import crypto
from pgvault.repository.repository import Repository, RepoSettings, StanzaInfo

CHECKOUT = Path(__file__).resolve().parents[2]
SEG = 1 << 20  # the stanza's WAL segment size: PostgreSQL allows 1 MiB
SYSID = 7300000000000000042
SEGMENT = "000000010000000000000003"


def make_segment(path: Path, sysid: int = SYSID, size: int = SEG, seed: int = 3) -> bytes:
    """A WAL segment as far as wal-push looks: a long page header with the system id, then
    compressible bytes."""
    head = bytearray(64)
    head[0:2] = (0xD110).to_bytes(2, "little")  # page magic (not checked)
    head[2:4] = (0x0002).to_bytes(2, "little")  # XLP_LONG_HEADER
    head[24:32] = sysid.to_bytes(8, "little")
    body = (f"record {seed} ".encode() * (size // 8))[: size - 64]
    data = bytes(head) + body
    path.write_bytes(data)
    return data


def make_repo(root: Path, passphrase: bytes | None = None) -> Path:
    repo = Repository.create(FsBackend(root), passphrase, RepoSettings(8192, 1 << 20))
    repo.create_stanza(StanzaInfo("main", str(SYSID), 150000, SEG, "2026-01-01T00:00:00Z"))
    return root


def stored(repo: Path, name: str = SEGMENT, stanza: str = "main") -> Path:
    return repo / "stanzas" / stanza / "wal" / name[:16] / name


def run(args: list[str], env: dict[str, str], cwd: Path, full: bool = False) -> subprocess.CompletedProcess[str]:
    """One process, as archive_command runs it: through the console entry point (fast path
    first), or straight into the full command line."""
    program = (
        "import sys; from pgvault.cli import main; sys.exit(main())"
        if full
        else "import sys; from pgvault._fastpath import main; sys.exit(main())"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    base["PYTHONPATH"] = str(CHECKOUT)
    return subprocess.run([sys.executable, "-c", program, *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_option_tables_match_config() -> None:
    names = {spec.name for spec in OPTIONS}
    assert set(_walpush.PARSERS) | _walpush.OTHERS == names
    assert not set(_walpush.PARSERS) & _walpush.OTHERS
    assert _walpush._FLAGS == {spec.name for spec in OPTIONS if spec.flag}
    assert not any(spec.multi for spec in OPTIONS if spec.name in _walpush.PARSERS)
    assert _walpush.DEFAULT_CONFIG == __import__("pgvault.config").config.DEFAULT_CONFIG


def test_libsodium_constants_match_pynacl() -> None:
    from nacl import bindings, pwhash

    assert crypto.NONCE_SIZE == bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
    assert crypto.TAG_SIZE == bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
    assert crypto.SALT_SIZE == pwhash.argon2id.SALTBYTES
    assert (crypto.KDF_OPSLIMIT, crypto.KDF_MEMLIMIT) == (
        pwhash.argon2id.OPSLIMIT_INTERACTIVE, pwhash.argon2id.MEMLIMIT_INTERACTIVE)


# Every value the fast path parses, valid and not: it must take exactly what config.py takes,
# and give the same value (or decline, leaving the error to the full path).
VALUES = {
    "compress": ["zstd", "lz4", "none", "gzip", "ZSTD"],
    "compress-level": ["1", "-7", "22", "23", "-8", "x", " 3", "1_0"],
    "jobs": ["1", "128", "0", "129", "2.5"],
    "log-level": ["warn", "debug", "trace"],
    "archive-async": ["y", "n", "on", "OFF", "true", "0", "maybe"],
    "archive-timeout": ["1", "86400", "0", "86401"],
    "repo-retry-timeout": ["180", "0"],
    "lock-timeout": ["0", "-1"],
    "archive-get-queue-max": ["16", "15", str(1 << 20)],
    "output": ["json", "xml"],
    "progress": ["never", "sometimes"],
    "block-size": ["8", "7", "16384", "16385"],
    "pack-size": ["1", "1025"],
    "keep-last": ["1", "0"],
    "target-action": ["promote", "resume"],
    "repo-s3-path-style": ["y", "no", "perhaps"],
    "delta": ["yes", "nope"],
    "pg-data": ["/data", "relative/dir"],
    "spool-path": ["/spool"],
}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, vs in VALUES.items() for v in vs])
@pytest.mark.parametrize("source", ["env", "file"])
def test_values_parse_as_config_does(tmp_path: Path, name: str, value: str, source: str) -> None:
    conf = tmp_path / "pgvault.conf"
    conf.write_text(f"[global]\n{name} = {value}\n" if source == "file" else "[global]\n")
    env = {"PGVAULT_CONFIG": str(conf), "PGVAULT_STANZA": "main"}
    if source == "env":
        env["PGVAULT_" + name.upper().replace("-", "_")] = value
    try:
        full = resolve("wal-push", ("x",), {}, env)
    except ConfigError:
        full = None
    try:
        fast, _ = _walpush.resolve(["wal-push", "x"], env)
    except Exception:
        fast = None
    assert (full is None) == (fast is None), (full, fast)
    if full is not None and fast is not None:
        assert fast[name] == getattr(full, name.replace("-", "_"))


def _options_of(args: list[str], env: dict[str, str]) -> dict[str, object]:
    """What the full command line resolves for args (its own argparse parser)."""
    from pgvault.cli import build_parser

    ns = vars(build_parser("wal-push").parse_args(args))
    ns.pop("command")
    positional = ns.pop("wal_path")
    opts = resolve("wal-push", (positional,), {k.replace("_", "-"): v for k, v in ns.items()}, env)
    return {"stanza": opts.stanza, "repo": opts.repo, "compress": opts.compress, "compress-level": opts.compress_level,
            "pg-data": opts.pg_data, "jobs": opts.jobs, "archive-async": opts.archive_async}


PRECEDENCE = [
    # (command line, environment, config file)
    ([], {"PGVAULT_REPO": "/env"}, "[global]\nrepo = /file\ncompress = lz4\n[main]\ncompress = none\njobs = 4\n"),
    (["--compress=zstd"], {"PGVAULT_COMPRESS": "lz4"}, "[global]\ncompress = none\n"),
    (["--compress", "lz4", "--jobs", "3"], {"PGVAULT_JOBS": "5"}, "[main]\njobs = 6\ncompress-level = 9\n"),
    ([], {"PGVAULT_COMPRESS_LEVEL": "4"}, "[global]\ncompress-level = 2\n[other]\ncompress-level = 7\n"),
    (["--pg-data=/pgdata"], {}, "[global]\npg-data = /elsewhere\nstanza = main\n"),
    (["--archive-async"], {"PGVAULT_ARCHIVE_ASYNC": "n"}, ""),
    ([], {"PGVAULT_ARCHIVE_ASYNC": "off"}, "[global]\narchive-async = y\n"),
]


@pytest.mark.parametrize(("cli", "env", "text"), PRECEDENCE)
def test_precedence_is_config_py(tmp_path: Path, cli: list[str], env: dict[str, str], text: str) -> None:
    conf = tmp_path / "pgvault.conf"
    conf.write_text(text)
    env = {"PGVAULT_CONFIG": str(conf), "PGVAULT_STANZA": "main", **env}
    args = [*cli, "wal-push", "seg"]
    full = _options_of(args, env)
    fast, words = _walpush.resolve(args, env)
    assert words == ["wal-push", "seg"]
    for name, value in full.items():
        default = {"compress": "zstd", "jobs": 2, "archive-async": False}.get(name)
        assert fast.get(name, default) == value, name


@pytest.mark.parametrize(
    "args",
    [
        ["--stan=main", "wal-push", "x"],  # an abbreviation argparse would accept
        ["--jobs=2", "--jobs=3", "wal-push", "x"],
        ["--annotation=a=b", "wal-push", "x"],
        ["--archive-async=y", "wal-push", "x"],
        ["--compress", "-1", "wal-push", "x"],
        ["-h", "wal-push", "x"],
        ["--version"],
        ["--", "wal-push", "x"],
    ],
)
def test_unusual_command_lines_go_to_the_full_path(args: list[str]) -> None:
    with pytest.raises(_walpush._Unsettled):
        _walpush.resolve(args, {})


def test_fast_path_stores_what_the_full_path_stores(tmp_path: Path) -> None:
    """Byte for byte: same envelope, codec, level and key, through real processes; and the
    fast path really ran (no argparse, no repository stack, no PyNaCl)."""
    segment = tmp_path / "pg_wal" / SEGMENT
    segment.parent.mkdir()
    make_segment(segment)
    conf = tmp_path / "pgvault.conf"
    conf.write_text("[global]\ncompress = lz4\n[main]\ncompress-level = 5\n")
    results = {}
    for mode in ("fast", "full"):
        repo = make_repo(tmp_path / f"repo-{mode}")
        env = {"PGVAULT_CONFIG": str(conf), "PGVAULT_COMPRESS": "zstd"}
        args = ["--stanza", "main", f"--repo={repo}", "--pg-data", str(tmp_path), "wal-push", f"pg_wal/{SEGMENT}"]
        proc = run(args, env, tmp_path, full=mode == "full")
        assert (proc.returncode, proc.stderr) == (0, "")
        results[mode] = stored(repo).read_bytes()
        assert Repository.open(FsBackend(repo), None).get_wal("main", SEGMENT) == segment.read_bytes()
    assert results["fast"] == results["full"]
    assert results["fast"][6] == 1  # envelope codec byte: zstd, from the environment over the file

    probe = (
        "import json, os, sys; from pgvault import _walpush; "
        f"ok = _walpush.push(['--stanza=main', '--repo={tmp_path / 'repo-probe'}', 'wal-push', {str(segment)!r}], os.environ); "
        "print(json.dumps([ok, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('argparse', 'dataclasses', 'nacl', 'blake3', 'lz4', 'configparser', 'uuid') "
        "or m in ('pgvault.config', 'pgvault.cli', 'pgvault.repository.repository', 'pgvault._accel'))]))"
    )
    make_repo(tmp_path / "repo-probe")
    proc = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(CHECKOUT)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [True, []]


def test_encrypted_repository(tmp_path: Path) -> None:
    segment = tmp_path / SEGMENT
    data = make_segment(segment)
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse\n")
    repo = make_repo(tmp_path / "repo", b"correct horse")
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    proc = run([f"--passphrase-file={wrong}", "--stanza=main", f"--repo={repo}", "wal-push", str(segment)], {}, tmp_path)
    assert proc.returncode == 6 and proc.stderr.count("\n") == 1 and "wrong passphrase" in proc.stderr
    assert not stored(repo).exists()
    proc = run(["--stanza=main", f"--repo={repo}", "wal-push", str(segment)], {"PGVAULT_PASSPHRASE_FILE": str(secret)},
               tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert Repository.open(FsBackend(repo), b"correct horse").get_wal("main", SEGMENT) == data


def test_bad_input_is_refused_with_one_line_like_the_full_path(tmp_path: Path) -> None:
    """Each bad call through the fast path's entry gives the full path's exit code and its
    one-line message, and writes nothing."""
    repo = make_repo(tmp_path / "repo")
    good = tmp_path / SEGMENT
    make_segment(good)
    short = tmp_path / "000000010000000000000004"
    short.write_bytes(good.read_bytes()[: SEG // 2])
    alien = tmp_path / "000000010000000000000005"
    make_segment(alien, sysid=SYSID + 1)
    bad_conf = tmp_path / "bad.conf"
    bad_conf.write_text("[global]\nbogus = 1\n")
    cases = [
        ([f"--repo={repo}", "--stanza=main", "wal-push", str(tmp_path / "000000010000000000000009")], {}, 9),
        ([f"--repo={repo}", "--stanza=main", "wal-push", str(tmp_path / "notwal")], {}, 3),
        ([f"--repo={repo}", "--stanza=main", "--compress-level=99", "wal-push", str(good)], {}, 3),
        ([f"--repo={repo}", "--stanza=main", "wal-push", str(good)], {"PGVAULT_COMPRESS": "gzip"}, 3),
        ([f"--repo={repo}", "--stanza=main", f"--config={bad_conf}", "wal-push", str(good)], {}, 3),
        ([f"--repo={repo}", "--stanza=main", f"--config={tmp_path / 'none.conf'}", "wal-push", str(good)], {}, 3),
        ([f"--repo={repo}", "--stanza=other", "wal-push", str(good)], {}, 3),
        ([f"--repo={tmp_path / 'norepo'}", "--stanza=main", "wal-push", str(good)], {}, 4),
        (["--repo=relative/repo", "--stanza=main", "wal-push", str(good)], {}, 3),
        ([f"--repo={repo}", "wal-push", str(good)], {}, 3),
        ([f"--repo={repo}", "--stanza=main", "wal-push", str(short)], {}, 9),
        ([f"--repo={repo}", "--stanza=main", "wal-push", str(alien)], {}, 7),
        ([f"--repo={repo}", "--stanza=main", "wal-push"], {}, 3),
    ]
    for args, env, code in cases:
        fast = run(args, env, tmp_path)
        full = run(args, env, tmp_path, full=True)
        assert (fast.returncode, fast.stderr) == (full.returncode, full.stderr), args
        assert fast.returncode == code, (args, fast.stderr)
        assert fast.stderr.startswith("pgvault: ") and fast.stderr.count("\n") == 1, fast.stderr
    assert not (repo / "stanzas" / "main" / "wal").exists()


def test_archived_again(tmp_path: Path) -> None:
    """The same segment again succeeds; different content under the name is refused (the
    fast path leaves both to the full path, which compares)."""
    repo = make_repo(tmp_path / "repo")
    segment = tmp_path / SEGMENT
    make_segment(segment)
    args = [f"--repo={repo}", "--stanza=main", "wal-push", str(segment)]
    assert run(args, {}, tmp_path).returncode == 0
    first = stored(repo).read_bytes()
    again = run(args, {}, tmp_path)
    assert (again.returncode, again.stderr) == (0, "")
    make_segment(segment, seed=4)
    changed = run(args, {}, tmp_path)
    assert changed.returncode == 9 and "different content" in changed.stderr and changed.stderr.count("\n") == 1
    assert stored(repo).read_bytes() == first
    assert not [p for p in stored(repo).parent.iterdir() if p.name.startswith(".tmp.")]
