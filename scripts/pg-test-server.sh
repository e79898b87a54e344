#!/usr/bin/env bash
# Run a command beside a throwaway PostgreSQL server, for the tests that need one:
#
#   scripts/pg-test-server.sh make test
#
# If ROUTER_TEST_POSTGRES_URL is already set, the command just runs. Otherwise this finds
# initdb (PATH or /usr/lib/postgresql/*/bin; as root it apt-get installs postgresql when
# neither has it), makes a cluster in a temporary directory (trust auth, fsync off: the data
# is thrown away), starts it on 127.0.0.1 at a free port plus a unix socket in that
# directory, exports ROUTER_TEST_POSTGRES_URL for the command, and stops and removes it on
# exit. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user. If any
# step fails it says so and runs the command anyway: the PostgreSQL tests then skip.
# Exits with the command's status.
set -uo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi

pg_say() { echo "pg-test-server: $*" >&2; }

pg_find_bin() {
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

pg_start() {
  local bin port
  bin=$(pg_find_bin)
  if [ -z "$bin" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    pg_say "installing postgresql (apt-get)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; then
      apt-get update -q >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1
    fi
    bin=$(pg_find_bin)
  fi
  if [ -z "$bin" ]; then
    pg_say "initdb not found and postgresql could not be installed"
    return 1
  fi
  local -a as=()
  if [ "$(id -u)" -eq 0 ]; then
    if ! id postgres >/dev/null 2>&1; then
      pg_say "running as root but there is no 'postgres' user to run the server as"
      return 1
    fi
    as=(runuser -u postgres --)
  fi
  PG_TMP=$(mktemp -d "${TMPDIR:-/tmp}/router-pg.XXXXXX") || return 1
  [ "${#as[@]}" -eq 0 ] || chown postgres: "$PG_TMP" || return 1
  port=$("${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || { pg_say "could not pick a free port (${PYTHON:-python3})"; return 1; }
  if ! "${as[@]}" "$bin/initdb" -D "$PG_TMP/data" -U postgres -A trust --no-sync -E UTF8 >"$PG_TMP/initdb.log" 2>&1; then
    pg_say "initdb failed:"; tail -n 20 "$PG_TMP/initdb.log" >&2
    return 1
  fi
  PG_CTL=("${as[@]}" "$bin/pg_ctl" -D "$PG_TMP/data")
  if ! "${PG_CTL[@]}" -l "$PG_TMP/server.log" -w -t 30 \
      -o "-h 127.0.0.1 -p $port -k $PG_TMP -F -c max_connections=50" start >/dev/null; then
    pg_say "the server did not start:"; tail -n 20 "$PG_TMP/server.log" >&2
    return 1
  fi
  PG_STARTED=1
  export ROUTER_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
  pg_say "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') at $ROUTER_TEST_POSTGRES_URL"
}

pg_stop() {
  if [ "${PG_STARTED:-0}" = 1 ]; then
    "${PG_CTL[@]}" -m immediate stop >/dev/null 2>&1
  fi
  [ -n "${PG_TMP:-}" ] && rm -rf "$PG_TMP"
}

if [ -n "${ROUTER_TEST_POSTGRES_URL:-}" ]; then
  exec "$@"
fi
trap pg_stop EXIT
if ! pg_start; then
  pg_stop; PG_TMP="" PG_STARTED=0
  pg_say "no PostgreSQL for the tests; they will skip"
fi
# Run the command in the background and wait, so that a TERM or INT reaches it at once (bash
# runs traps only between commands) and the server is still removed when it ends.
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child"
rc=$?
while kill -0 "$child" 2>/dev/null; do  # interrupted by a signal: wait for the command to finish
  wait "$child"
  rc=$?
done
exit "$rc"
