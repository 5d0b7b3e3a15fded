#!/usr/bin/env bash
# End-to-end demo of pgvault on a throwaway cluster:
#   archive WAL with `pgvault wal-push`, stanza-create, backup, info, more writes,
#   restore into a new directory, start the copy on another port, and check that it
#   holds exactly the source's final data (WAL replayed to the end), passes
#   pg_amcheck and pg_checksums.  Prints PASS or FAIL; exit status 0 / 1.
#
#   scripts/demo.sh                  # PostgreSQL 15 (Debian)
#   PGVAULT_DEMO_PG=17 scripts/demo.sh
#   PGVAULT_DEMO_KEEP=1 ...          # keep the work dir (clusters, repo, logs)
#
# Why a script: it is the quickest way for a person to see the whole tool work.
# As root it runs setup.sh and re-runs itself as the unprivileged test user,
# because PostgreSQL refuses to run as root.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEST_USER=${PGVAULT_TEST_USER:-pgvault}
MAJOR=${PGVAULT_DEMO_PG:-15}
SCALE=${PGVAULT_DEMO_SCALE:-10}

if [ "$(id -u)" -eq 0 ]; then
    PGVAULT_TEST_PG_VERSIONS=$MAJOR "$ROOT/scripts/setup.sh"
    exec runuser -u "$TEST_USER" -- env \
        PGVAULT_DEMO_SETUP_DONE=1 TMPDIR=/tmp \
        PGVAULT_VENV="${PGVAULT_VENV:-/opt/pgvault-venv}" \
        PGVAULT_PG_CACHE="${PGVAULT_PG_CACHE:-/opt/pgvault-pg}" \
        bash "$ROOT/scripts/demo.sh" "$@"
fi
if [ -z "${PGVAULT_DEMO_SETUP_DONE:-}" ]; then
    PGVAULT_TEST_PG_VERSIONS=$MAJOR "$ROOT/scripts/setup.sh"
fi
VENV=${PGVAULT_VENV:-$HOME/.cache/pgvault/venv}
export PGVAULT_PG_CACHE=${PGVAULT_PG_CACHE:-$HOME/.cache/pgvault/pg}
PY="$VENV/bin/python"
PGVAULT="$VENV/bin/pgvault"
[ -x "$PGVAULT" ] || { echo "demo.sh: $PGVAULT not found (is the project installed?)" >&2; exit 1; }

# Don't let a caller's libpq settings redirect any command to another server.
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD PGSERVICE PGDATA PGOPTIONS

step() { printf '\n=== %s\n' "$*"; }

# Binaries for the chosen major, plus LD_LIBRARY_PATH if that build needs it.
eval "$(cd "$ROOT" && "$PY" - "$MAJOR" <<'EOF'
import shlex, sys
from tests.support.pgbins import pg_bindir, pg_env
from tests.support.pgserver import free_port
bindir = pg_bindir(int(sys.argv[1]))
print(f"BINDIR={shlex.quote(str(bindir))}")
ld = pg_env(bindir, {}).get("LD_LIBRARY_PATH")
if ld:
    print(f"export LD_LIBRARY_PATH={shlex.quote(ld)}")
print(f"SRC_PORT={free_port()} DST_PORT={free_port()}")
EOF
)"
[ -n "${BINDIR:-}" ] || { echo "demo.sh: could not locate PostgreSQL $MAJOR" >&2; exit 1; }
export PATH="$BINDIR:$VENV/bin:$PATH"

WORK=$(mktemp -d /tmp/pgvault-demo.XXXXXX)   # short: Unix socket paths max ~107 bytes
REPO=$WORK/repo
SRC=$WORK/src
DST=$WORK/restored
SRC_SOCK=$WORK/s1
DST_SOCK=$WORK/s2
mkdir -m 0700 "$SRC_SOCK" "$DST_SOCK"
SRC_CONN="host=$SRC_SOCK port=$SRC_PORT dbname=postgres user=postgres"
PV=("$PGVAULT" --stanza=demo --repo="$REPO")
RESULT=FAIL

cleanup() {
    local d
    for d in "$DST" "$SRC"; do
        [ -f "$d/postmaster.pid" ] && pg_ctl stop -D "$d" -m immediate -w >/dev/null 2>&1 || true
    done
    if [ "$RESULT" != PASS ]; then
        for d in src restored; do
            [ -f "$WORK/$d.log" ] && { echo "--- tail of $d.log"; tail -n 30 "$WORK/$d.log"; }
        done
    fi
    if [ "${PGVAULT_DEMO_KEEP:-0}" = 1 ]; then
        echo "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    echo
    echo "$RESULT"
}
trap cleanup EXIT

src_sql() { psql -XAtq -v ON_ERROR_STOP=1 -h "$SRC_SOCK" -p "$SRC_PORT" -U postgres -d postgres -c "$1"; }
dst_sql() { psql -XAtq -v ON_ERROR_STOP=1 -h "$DST_SOCK" -p "$DST_PORT" -U postgres -d postgres -c "$1"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for $what" >&2; return 1; }
        sleep 0.5
    done
}

step "PostgreSQL $MAJOR from $BINDIR; work dir $WORK"
initdb -D "$SRC" -U postgres --auth=trust -E UTF8 --locale=C --data-checksums >/dev/null
cat >> "$SRC/postgresql.conf" <<EOF
# added by scripts/demo.sh
listen_addresses = '127.0.0.1'
port = $SRC_PORT
unix_socket_directories = '$SRC_SOCK'
wal_level = replica
max_wal_senders = 10
archive_mode = on
archive_command = '"$PGVAULT" --stanza=demo --repo="$REPO" wal-push "%p"'
EOF
pg_ctl start -D "$SRC" -w -l "$WORK/src.log" >/dev/null

step "pgbench -i -s $SCALE"
pgbench -h "$SRC_SOCK" -p "$SRC_PORT" -U postgres -i -s "$SCALE" -q postgres

step "pgvault stanza-create"
"${PV[@]}" --pg-conninfo="$SRC_CONN" --pg-data="$SRC" stanza-create

step "pgvault backup"
"${PV[@]}" --pg-conninfo="$SRC_CONN" --pg-data="$SRC" backup

step "pgvault info"
"${PV[@]}" info

step "more writes after the backup (pgbench -t 2000)"
pgbench -h "$SRC_SOCK" -p "$SRC_PORT" -U postgres -n -c 4 -j 2 -t 2000 postgres | grep -E '^(tps|number of transactions actually)' || true

EXPECTED=$(src_sql "select count(*), sum(abalance) from pgbench_accounts")
LAST_WAL=$(src_sql "select pg_walfile_name(pg_switch_wal())")
step "source has (count, sum) = $EXPECTED; waiting for WAL $LAST_WAL to be archived"
archived() {  # last archived segment (first 24 chars: skip .backup/.partial suffixes) >= LAST_WAL
    local last
    last=$(src_sql "select coalesce(last_archived_wal, '') from pg_stat_archiver")
    [ -n "$last" ] && ! [[ "${last:0:24}" < "$LAST_WAL" ]]
}
wait_for 120 "WAL archiving" archived

step "pgvault restore --pg-data $DST"
"${PV[@]}" --pg-data="$DST" restore

step "start the restored cluster on port $DST_PORT (archive_mode off: it is a throwaway copy)"
# -p/-k/-c on the command line override the copied postgresql.conf without editing it.
pg_ctl start -D "$DST" -w -t 300 -l "$WORK/restored.log" \
    -o "-p $DST_PORT -k $DST_SOCK -h 127.0.0.1 -c archive_mode=off" >/dev/null
not_in_recovery() { [ "$(dst_sql "select pg_is_in_recovery()")" = f ]; }
wait_for 300 "the end of recovery" not_in_recovery

GOT=$(dst_sql "select count(*), sum(abalance) from pgbench_accounts")
step "restored has (count, sum) = $GOT"
OK=1
[ "$GOT" = "$EXPECTED" ] || { echo "MISMATCH: expected $EXPECTED, got $GOT"; OK=0; }

step "pg_amcheck --all --heapallindexed on the restored cluster"
pg_amcheck -h "$DST_SOCK" -p "$DST_PORT" -U postgres --all --install-missing --heapallindexed \
    || { echo "pg_amcheck reported problems"; OK=0; }

step "pg_checksums --check on the restored cluster (stopped)"
pg_ctl stop -D "$DST" -m fast -w >/dev/null
pg_checksums --check -D "$DST" || { echo "pg_checksums reported problems"; OK=0; }

[ "$OK" = 1 ] && RESULT=PASS
[ "$RESULT" = PASS ]
