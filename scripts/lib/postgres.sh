# shellcheck shell=bash
# A throwaway PostgreSQL server for the tests, from Debian's package (not its system
# cluster): `pg_start DIR` initializes DIR (trust auth, loopback only, its own port),
# starts the server as the `postgres` user, exports SANDPIT_TEST_POSTGRES (a base URL
# without a database name; tests create their own databases) and stops it when the
# calling shell exits. Needs root (it runs the server as `postgres`).

pg_start() {
  local dir=$1 bin port
  bin=$(find /usr/lib/postgresql -maxdepth 3 -name initdb -path '*/bin/*' 2>/dev/null | sort -V | tail -1)
  bin=${bin%/initdb}
  if [ -z "$bin" ]; then
    echo "postgres: no initdb under /usr/lib/postgresql (scripts/install-deps installs it)" >&2
    return 1
  fi
  id postgres >/dev/null 2>&1 || { echo "postgres: no 'postgres' user (the package makes it)" >&2; return 1; }
  port=${SANDPIT_TEST_POSTGRES_PORT:-54329}
  # A server left by an interrupted run holds the port: stop it first.
  if [ -f "$dir/data/postmaster.pid" ]; then
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  install -d -o postgres -g postgres -m 0700 "$dir" "$dir/data" "$dir/sock"
  runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres --auth=trust \
    --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  # fsync off: a test server's data need not survive a power loss. The first free port from
  # $port on (another run on this machine may hold one).
  local tries=0
  until runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir/sock -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" \
    start >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 10 ] || ! grep -q 'Address already in use' "$dir/server.log"; then
      cat "$dir/server.log" >&2
      return 1
    fi
    port=$((port + 1))
  done
  PG_TEST_DIR=$dir
  PG_TEST_BIN=$bin
  export SANDPIT_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port"
  trap pg_stop EXIT
  echo "postgres: $("$bin/postgres" --version) on 127.0.0.1:$port (data in $dir)"
}

pg_stop() {
  [ -n "${PG_TEST_DIR:-}" ] || return 0
  runuser -u postgres -- "$PG_TEST_BIN/pg_ctl" -D "$PG_TEST_DIR/data" -m fast stop >/dev/null 2>&1 || true
  PG_TEST_DIR=
}
