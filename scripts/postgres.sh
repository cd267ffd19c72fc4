#!/usr/bin/env bash
# A throwaway PostgreSQL server for the PostgreSQL key-store tests.
#
# Installs Debian's `postgresql` package if its server binaries are missing, creates
# a cluster under target/pg (once), starts it on a free loopback port with its Unix
# socket in target/pg/run (owner-only; or reuses the one already running), creates the role and
# database `qkdnet`, and prints ONE line on stdout:
#
#   QKDNET_TEST_PG=postgres://qkdnet:PASSWORD@127.0.0.1:PORT/qkdnet
#
# Everything else goes to stderr, so a caller can do
#
#   pg_line=$(bash scripts/postgres.sh) && export "$pg_line"
#
# The server is left running (a re-run finds and reuses it). Stop it with
#   bash scripts/postgres.sh stop     (scripts/test.sh does, at its end)
# and delete target/pg to start from scratch. PostgreSQL refuses to run as root, so
# as root the cluster belongs to the `postgres` system user (created by the package).
# TCP is on 127.0.0.1 only, with a random password (SCRAM) kept in target/pg; the
# cluster is test data only.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "postgres.sh: $*" >&2; }
mode="${1:-start}"

find_bin() {
  local d
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return 0
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

if ! bindir=$(find_bin); then
  [ "$mode" = stop ] && exit 0
  log "installing Debian's postgresql package (initdb/pg_ctl not found)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  else
    sudo apt-get update -qq >&2 && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  fi
  bindir=$(find_bin) || { log "postgresql installed but initdb/pg_ctl still not found"; exit 1; }
fi

base="$PWD/target/pg"
mkdir -p "$base"

# As root, every server command runs as the `postgres` user, which owns target/pg
# (or, if that user cannot reach the work tree, a directory under /var/tmp).
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || { log "no 'postgres' system user (install the postgresql package)"; exit 1; }
  command -v runuser >/dev/null 2>&1 || { log "runuser (util-linux) is needed to run PostgreSQL as 'postgres'"; exit 1; }
  as_pg() { runuser -u postgres -- "$@"; }
  chown postgres: "$base"
  if ! as_pg test -w "$base"; then
    base="/var/tmp/qkdnet-pg-$(printf '%s' "$PWD" | cksum | cut -d' ' -f1)"
    log "the postgres user cannot write under $PWD; using $base"
    mkdir -p "$base"
    chown postgres: "$base"
  fi
else
  as_pg() { "$@"; }
fi
data="$base/data"
run="$base/run"
as_pg mkdir -p "$run"
chmod 700 "$run" # the socket accepts anyone who can reach it (trust): only the owner can
pg_ctl=("$bindir/pg_ctl" -D "$data")
if [ "$mode" = stop ]; then
  if [ -f "$data/PG_VERSION" ] && as_pg "${pg_ctl[@]}" status >/dev/null 2>&1; then
    log "stopping the server"
    as_pg "${pg_ctl[@]}" stop -m fast -w >&2
  fi
  exit 0
fi
psql_bin="$bindir/psql"
[ -x "$psql_bin" ] || psql_bin=psql

if [ ! -s "$base/password" ]; then
  (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$base/password")
  [ "$(id -u)" = 0 ] && chown postgres: "$base/password"
fi
password=$(cat "$base/password")

if [ ! -f "$data/PG_VERSION" ]; then
  log "creating a cluster in $data"
  rm -rf "$data"
  as_pg "$bindir/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C >&2
fi

free_port() {
  local p
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  for p in $(seq 25432 25532); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  return 1
}

if as_pg "${pg_ctl[@]}" status >/dev/null 2>&1 && [ -s "$base/port" ]; then
  port=$(cat "$base/port")
  log "reusing the server running on 127.0.0.1:$port"
else
  port=$(free_port)
  echo "$port" >"$base/port"
  log "starting the server on 127.0.0.1:$port"
  as_pg "${pg_ctl[@]}" -l "$base/server.log" -w -t 60 \
    -o "-p $port -k $run -c listen_addresses=127.0.0.1 -c log_statement=none" start >&2 \
    || { log "server did not start; its log:"; tail -n 30 "$base/server.log" >&2 || true; exit 1; }
fi

psql_su() { as_pg "$psql_bin" -X -q -v ON_ERROR_STOP=1 -h "$run" -p "$port" -U postgres -d postgres "$@"; }
if [ "$(psql_su -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'qkdnet'")" != 1 ]; then
  psql_su -c "CREATE ROLE qkdnet LOGIN PASSWORD '$password'" >&2
fi
if [ "$(psql_su -tAc "SELECT 1 FROM pg_database WHERE datname = 'qkdnet'")" != 1 ]; then
  psql_su -c "CREATE DATABASE qkdnet OWNER qkdnet" >&2
fi

echo "QKDNET_TEST_PG=postgres://qkdnet:$password@127.0.0.1:$port/qkdnet"
