#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 and accepts the URL in
# KILN_TEST_PG_URL: starts the local cluster when it is down, installs PostgreSQL with the
# system package manager when it is missing, and sets the postgres user's password on a fresh
# install (Debian's default pg_hba wants one over TCP).
set -euo pipefail

url=${KILN_TEST_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
say() { echo "ensure-postgres: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else say "need root for: $*"; return 1; fi; }
ready() { command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q; }
can_login() { psql "$url" -qAtc 'SELECT 1' >/dev/null 2>&1; }

start_clusters() {
    command -v pg_ctlcluster >/dev/null || return 0
    for version in $(ls /etc/postgresql 2>/dev/null); do
        for cluster in $(ls "/etc/postgresql/$version" 2>/dev/null); do
            as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start 2>/dev/null || true
        done
    done
}

if ! command -v psql >/dev/null || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    if ! ready; then
        say "PostgreSQL is not installed; installing it with apt-get"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >/dev/null
    fi
fi

if ! ready; then
    say "PostgreSQL is not running; starting it"
    start_clusters
fi
for _ in $(seq 1 60); do ready && break; sleep 0.5; done
ready || { say "PostgreSQL did not come up on 127.0.0.1:5432"; exit 1; }

if ! can_login; then
    say "setting the postgres user's password for TCP logins"
    password=$(printf '%s' "$url" | sed -n 's|^postgres[a-z]*://[^:]*:\([^@]*\)@.*|\1|p')
    as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD '${password:-postgres}'\"" >/dev/null
fi
can_login || { say "cannot log in with $url"; exit 1; }
say "ready at 127.0.0.1:5432"
