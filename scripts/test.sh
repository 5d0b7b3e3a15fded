#!/usr/bin/env bash
# Run pgvault's test suite:  scripts/test.sh [pytest args]   (default: tests -q)
#
# Why: PostgreSQL refuses to run as root, so as root this first runs setup.sh and
# then runs pytest as the unprivileged test user (default: pgvault).  pytest's temp
# dirs, cache and hypothesis' database go to a state dir that user owns, so the
# checkout itself never needs to be writable by it.  Exits with pytest's status.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEST_USER=${PGVAULT_TEST_USER:-pgvault}

"$ROOT/scripts/setup.sh"

if [ "$(id -u)" -eq 0 ]; then
    VENV=${PGVAULT_VENV:-/opt/pgvault-venv}
    export PGVAULT_PG_CACHE=${PGVAULT_PG_CACHE:-/opt/pgvault-pg}
    STATE=${PGVAULT_STATE_DIR:-/var/tmp/pgvault-test}
    install -d -o "$TEST_USER" -g "$(id -gn "$TEST_USER")" -m 0700 "$STATE"
    AS_USER=(runuser -u "$TEST_USER" --)
else
    VENV=${PGVAULT_VENV:-$HOME/.cache/pgvault/venv}
    export PGVAULT_PG_CACHE=${PGVAULT_PG_CACHE:-$HOME/.cache/pgvault/pg}
    STATE=${PGVAULT_STATE_DIR:-${TMPDIR:-/tmp}/pgvault-test-$(id -u)}
    install -d -m 0700 "$STATE"
    AS_USER=()
fi

# Safety net: immediately stop any postmaster still running on a data dir under
# our state dir (a previous run killed hard, or a test that leaked a server).
stop_stray_postmasters() {
    local pidfile pid
    while IFS= read -r pidfile; do
        pid=$(head -n1 "$pidfile" 2>/dev/null || true)
        if [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
            echo "test.sh: stopping stray postmaster $pid ($(dirname "$pidfile"))" >&2
            kill -QUIT "$pid" 2>/dev/null || true
        fi
    done < <(find "$STATE" -name postmaster.pid 2>/dev/null)
}
stop_stray_postmasters
trap stop_stray_postmasters EXIT

[ $# -gt 0 ] || set -- tests -q

cd "$ROOT"
set +e
"${AS_USER[@]}" env \
    PATH="$VENV/bin:$PATH" \
    TMPDIR=/tmp \
    PGVAULT_PG_CACHE="$PGVAULT_PG_CACHE" \
    PGVAULT_REQUIRE_PG=1 \
    PGVAULT_REQUIRE_EMULATORS=1 \
    PGVAULT_AZURITE_DIR="${PGVAULT_AZURITE_DIR:-$([ "$(id -u)" -eq 0 ] && echo /opt/pgvault-azurite || echo "$HOME/.cache/pgvault/azurite")}" \
    PGVAULT_HYPOTHESIS_DIR="$STATE/hypothesis" \
    "$VENV/bin/python" -m pytest -p no:cacheprovider --basetemp="$STATE/basetemp" "$@"
rc=$?
set -e
exit "$rc"
