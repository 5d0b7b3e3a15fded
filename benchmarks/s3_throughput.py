"""Backup and restore throughput to S3 (moto on loopback): pgvault and pgBackRest side by side.

Run as an unprivileged user (PostgreSQL refuses root):

    python -m benchmarks.s3_throughput --pg 15 --scale 50 --jobs 2 --rounds 3 \
        [--incompressible-mib 1024] [--pgbackrest /opt/pgbackrest-build/src/pgbackrest]

One moto server serves one bucket per engine over HTTPS (pgBackRest's S3 driver only speaks
TLS), with a throwaway self-signed certificate for 127.0.0.1 that both engines verify (pgvault
through boto3's standard AWS_CA_BUNDLE, pgBackRest through repo1-storage-ca-file). Engines alternate
(A B B A ...) and medians are reported. MB/s is the database size over the command's wall
time, the same yardstick for both. Requests are counted from moto's access log per bucket
while the command runs (so they include WAL archived meanwhile); "requests per GB written"
divides them by the bytes the command added to its bucket outside the WAL archive, for the
first full backup (later pgvault fulls store only what the repository lacks).
Both share 2 cores with the emulator, so absolute numbers are far below a real S3 link;
the comparison and the request counts are what carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench  # noqa: E402
from benchmarks.bench import Sample, add_incompressible, timed  # noqa: E402
from tests.support.emulators import Moto  # noqa: E402
from tests.support.pgserver import PgServer  # noqa: E402

# werkzeug colours some access-log lines (ANSI escapes before the method).
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)?(GET|PUT|POST|HEAD|DELETE) /([^/?" ]+)')
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


class TlsRelay:
    """TLS in front of moto's plain HTTP port.

    moto's own HTTPS mode (werkzeug) closes connections without a TLS close_notify, which
    OpenSSL 3 clients such as pgBackRest report as "unexpected eof while reading"; this relay
    ends every connection properly. Both engines go through it, so the TLS cost is the same.
    """

    def __init__(self, upstream_port: int, cert: Path, key: Path) -> None:
        self.upstream_port = upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        # One thread per connection does all TLS calls: an SSL object must not be used by
        # two threads at once.
        try:
            while True:
                ready = [client] if client.pending() else select.select([client, upstream], [], [])[0]
                if client in ready:
                    data = client.recv(1 << 20)
                    if not data:
                        break
                    upstream.sendall(data)
                if upstream in ready:
                    data = upstream.recv(1 << 20)
                    if not data:
                        client.unwrap()  # close_notify, then close
                        break
                    client.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            upstream.close()
            client.close()

    def close(self) -> None:
        self.sock.close()


def self_signed_certificate(cert: Path, key: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))


class S3Log:
    """Counts requests per bucket from moto's access log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for match in REQUEST.finditer(self.path.read_text(errors="replace")):
            found[match.group(2)] = found.get(match.group(2), 0) + 1
        return found


def s3_client(url: str, ca: Path) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=url, verify=str(ca), region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")


def bucket_bytes(client: Any, bucket: str, skip: str) -> int:
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(o["Size"] for o in page.get("Contents", ()) if f"/{skip}/" not in "/" + o["Key"])
    return total


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")


class PgVault:
    name = "pgvault"
    bucket = "bench-pgvault"
    wal_dir = "wal"

    def __init__(self, work: Path, server: PgServer, jobs: int, url: str, ca: Path) -> None:
        self.server = server
        self.base = [sys.executable, "-m", "pgvault", "--stanza=bench", f"--repo=s3://{self.bucket}/repo",
                     f"--repo-endpoint={url}", "--repo-s3-path-style", f"--jobs={jobs}"]
        self.env = {**AWS_ENV, "AWS_CA_BUNDLE": str(ca)}

    def archive_command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"env {env} PYTHONPATH={Path(__file__).resolve().parents[1]} " + " ".join(self.base) + " wal-push %p"

    def setup(self) -> None:
        run([*self.base, f"--pg-conninfo={self.server.conninfo()}", "stanza-create"], self.env)

    def backup(self) -> Sample:
        return timed([*self.base, f"--pg-conninfo={self.server.conninfo()}", "backup", "--type=full"], self.env)

    def restore(self, target: Path) -> Sample:
        return timed([*self.base, "restore", f"--pg-data={target}", "--type=none"], self.env)


class PgBackRest(bench.PgBackRest):
    """bench.PgBackRest with an S3 repository (through the TLS relay) and full backups only."""

    bucket = "bench-pgbackrest"
    wal_dir = "archive"

    def __init__(self, work: Path, server: PgServer, jobs: int, port: int, ca: Path, exe: str) -> None:
        super().__init__(
            work, server, jobs, exe,
            repo_conf=(
                f"repo1-type=s3\nrepo1-path=/repo\nrepo1-s3-bucket={self.bucket}\nrepo1-s3-endpoint=127.0.0.1\n"
                f"repo1-storage-port={port}\nrepo1-s3-region=us-east-1\nrepo1-s3-key=bench\nrepo1-s3-key-secret=bench\n"
                f"repo1-s3-uri-style=path\nrepo1-storage-ca-file={ca}\n"
            ),
            block_incremental=False,
        )
        self.env: dict[str, str] = {}

    def setup(self) -> None:
        run([*self.base(), "stanza-create"])

    def backup(self) -> Sample:  # type: ignore[override]
        return timed([*self.base(), "backup", "--type=full"])

    def restore(self, target: Path) -> Sample:
        return timed([*self.base(), "restore", f"--pg1-path={target}", "--type=none"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", type=int, default=15)
    parser.add_argument("--scale", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--incompressible-mib", type=int, default=0)
    parser.add_argument("--pgbackrest", default=shutil.which("pgbackrest") or "")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pgvault-s3bench-", dir="/var/tmp"))
    moto = Moto()
    moto.start()
    cert, key = work / "cert.pem", work / "key.pem"
    self_signed_certificate(cert, key)
    relay = TlsRelay(moto.port, cert, key)
    url = f"https://127.0.0.1:{relay.port}"
    client = s3_client(url, cert)
    log = S3Log(moto.workdir / "log")
    server = PgServer(args.pg, work / "cluster")
    engines: list[PgVault | PgBackRest] = [PgVault(work, server, args.jobs, url, cert)]
    if args.pgbackrest:
        engines.append(PgBackRest(work, server, args.jobs, relay.port, cert, args.pgbackrest))
    for engine in engines:
        client.create_bucket(Bucket=engine.bucket)
    results: dict[str, dict[str, list[float]]] = {e.name: {} for e in engines}
    try:
        server.init(archive_command=" && ".join(e.archive_command() for e in engines),
                    extra_conf={"max_wal_size": "4GB", "checkpoint_timeout": "30min"})
        server.start()
        server.pgbench("-i", "-s", str(args.scale), "-q")
        if args.incompressible_mib:
            add_incompressible(server, args.incompressible_mib)
        server.psql("checkpoint;")
        db_mb = int(server.psql("select sum(pg_database_size(oid)) from pg_database")) / 1e6
        for engine in engines:
            engine.setup()
        server.switch_wal_and_wait_archived(timeout=1800)
        for rnd in range(args.rounds):
            for engine in engines if rnd % 2 == 0 else list(reversed(engines)):
                stats = results[engine.name]
                before_bytes, before_req = bucket_bytes(client, engine.bucket, engine.wal_dir), log.counts()
                s = engine.backup()
                written = bucket_bytes(client, engine.bucket, engine.wal_dir) - before_bytes
                requests = log.counts().get(engine.bucket, 0) - before_req.get(engine.bucket, 0)
                # The first full writes everything; pgvault's later fulls store only blocks the
                # repository lacks, so their bytes and requests per GB are reported apart.
                phase = "first_backup" if rnd == 0 else "later_backup"
                stats.setdefault(f"{phase}_MBps", []).append(db_mb / s.wall)
                stats.setdefault(f"{phase}_wall_s", []).append(s.wall)
                stats.setdefault(f"{phase}_cpu_s", []).append(s.cpu)
                stats.setdefault(f"{phase}_written_MB", []).append(written / 1e6)
                stats.setdefault(f"{phase}_requests", []).append(requests)
                if rnd == 0:
                    stats.setdefault("first_backup_requests_per_GB_written", []).append(requests / max(written / 1e9, 1e-9))
                target = work / f"restore-{engine.name}"
                shutil.rmtree(target, ignore_errors=True)
                before_req = log.counts()
                s = engine.restore(target)
                stats.setdefault("restore_MBps", []).append(db_mb / s.wall)
                stats.setdefault("restore_wall_s", []).append(s.wall)
                stats.setdefault("restore_requests", []).append(log.counts().get(engine.bucket, 0) - before_req.get(engine.bucket, 0))
                shutil.rmtree(target, ignore_errors=True)
    finally:
        server.cleanup()
        relay.close()
        moto.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    medians = {e: {k: statistics.median(v) for k, v in r.items()} for e, r in results.items()}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "pg": args.pg, "scale": args.scale, "incompressible_mib": args.incompressible_mib, "db_MB": round(db_mb),
        "jobs": args.jobs, "rounds": args.rounds,
        "pgbackrest": engines[1].version if len(engines) > 1 else None,  # type: ignore[union-attr]
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta))
    keys = sorted({k for m in medians.values() for k in m})
    print("| metric | " + " | ".join(medians) + " |\n|---" * 1 + "|---" * len(medians) + "|")
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{medians[e].get(key, float('nan')):.1f}" for e in medians) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "medians": medians, "raw": results}, indent=1))


if __name__ == "__main__":
    main()
