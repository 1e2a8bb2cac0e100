#!/usr/bin/env bash
# A private PostgreSQL server for the test suite (the fleet tuning tests need a real one).
#
#   bash tests/postgres.sh start   # install Debian's postgresql if missing, start, print the URL
#   bash tests/postgres.sh url     # print the URL of the running server
#   bash tests/postgres.sh stop    # stop it and delete its data
#
# The cluster lives in the repository's git-ignored .pg/ folder (or, when the postgres user
# cannot reach that folder, in a private folder under /tmp named in .pg/folder). It listens
# on 127.0.0.1 at a free port and on a unix socket in a folder it owns, trusts local
# connections (it holds only throw-away test databases) and runs as the postgres user when
# started by root (initdb refuses to run as root), else as the calling user.
# Typical use:  export KGEN_TEST_PG_URL=$(bash tests/postgres.sh start)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="$ROOT/.pg"
DBNAME=kgen_test
SUPERUSER=kgen

log() { echo "postgres.sh: $*" >&2; }

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then echo "$dir"; return 0; fi
    command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
    return 1
}

install_server() {
    if pg_bin >/dev/null; then return 0; fi
    if [[ $(id -u) -ne 0 ]]; then
        log "PostgreSQL is not installed and this is not root: run 'sudo apt-get install postgresql'"
        exit 1
    fi
    log "installing Debian's postgresql package (apt-get update once, then install)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends postgresql >&2
    pg_bin >/dev/null || { log "postgresql installed but initdb was not found"; exit 1; }
}

# Run a command as the cluster's owner.
as_owner() {
    # from / : the checkout may be a folder the postgres user cannot enter
    if [[ $(id -u) -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

url() {
    [[ -f "$STATE/url" ]] || { log "no server started (run: bash tests/postgres.sh start)"; exit 1; }
    cat "$STATE/url"
}

running() {
    [[ -f "$STATE/folder" && -f "$STATE/url" ]] || return 1
    local folder bin
    folder=$(cat "$STATE/folder")
    bin=$(pg_bin) || return 1
    [[ -d "$folder/db" ]] && as_owner "$bin/pg_ctl" -D "$folder/db" status >/dev/null 2>&1
}

start() {
    install_server
    if running; then url; return 0; fi
    stop 2>/dev/null  # leftovers of a server that is gone
    local bin data sock port
    bin=$(pg_bin)
    mkdir -p "$STATE"
    chmod 755 "$STATE"
    data="$STATE/data"
    # The owner must reach the data folder; a checkout under a private home folder is not
    # reachable by the postgres user, so use a private temporary folder then.
    if [[ $(id -u) -eq 0 ]] && ! runuser -u postgres -- test -x "$STATE"; then
        data=$(mktemp -d /tmp/kgen-pg.XXXXXX)
    fi
    rm -rf "$data"
    mkdir -p "$data"
    sock="$data/sock"
    # unix socket paths are limited to about 100 bytes
    if (( ${#sock} > 90 )); then sock=$(mktemp -d /tmp/kgen-pgsock.XXXXXX); fi
    mkdir -p "$sock"
    if [[ $(id -u) -eq 0 ]]; then chown -R postgres: "$data" "$sock"; fi
    port=$(free_port)
    echo "$data" > "$STATE/folder"
    echo "$sock" > "$STATE/sock"
    as_owner "$bin/initdb" -D "$data/db" -U "$SUPERUSER" --auth=trust -E UTF8 --locale=C.UTF-8 \
        >"$STATE/initdb.log" 2>&1 || { cat "$STATE/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$data/db" -l "$data/server.log" -w -t 60 \
        -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$sock -c max_connections=200 -c fsync=off" \
        start >&2 || { cat "$data/server.log" >&2 || true; exit 1; }
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$SUPERUSER" "$DBNAME"
    echo "postgresql://$SUPERUSER@127.0.0.1:$port/$DBNAME" > "$STATE/url"
    url
}

stop() {
    if [[ ! -f "$STATE/folder" ]]; then log "no server to stop"; return 0; fi
    local folder bin
    folder=$(cat "$STATE/folder")
    bin=$(pg_bin) || true
    if [[ -n "${bin:-}" && -d "$folder/db" ]]; then
        as_owner "$bin/pg_ctl" -D "$folder/db" -m fast -w stop >&2 || true
    fi
    # the folder holds the cluster (db/), the server log and usually the socket folder
    [[ -n "$folder" && "$folder" != / ]] && rm -rf "$folder"
    if [[ -f "$STATE/sock" ]]; then
        local sock
        sock=$(cat "$STATE/sock")
        [[ -n "$sock" && "$sock" != / ]] && rm -rf "$sock"
    fi
    rm -f "$STATE/folder" "$STATE/sock" "$STATE/url" "$STATE/initdb.log"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) url ;;
    *) echo "usage: bash tests/postgres.sh start|stop|url" >&2; exit 2 ;;
esac
