#!/usr/bin/env bash
# PostgreSQL at DATABASE_URL and Redis at REDIS_URL, started here when none answer.
#
#   deploy/services.sh up STATE_DIR           start what does not answer; keep it running (make dev)
#   deploy/services.sh run STATE_DIR CMD ...  the same, run CMD, then stop only what was started here
#                                             and pass on CMD's exit status (make test)
#
# A PostgreSQL started here is a cluster of its own (initdb) under STATE_DIR/postgres on the URL's
# port, trust auth for user postgres; Redis keeps nothing on disk. Services already answering are
# never touched, and nothing shared is ever started or stopped.
set -euo pipefail

mode=${1:?usage: services.sh up|run STATE_DIR [CMD ...]}
state=${2:?usage: services.sh up|run STATE_DIR [CMD ...]}
shift 2
mkdir -p "$state"
state=$(cd "$state" && pwd)

export DATABASE_URL="${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

url_part() {  # url_part URL host|port DEFAULT_PORT
  python3 -c 'import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(p.hostname or "127.0.0.1" if sys.argv[2] == "host" else p.port or sys.argv[3])' "$@"
}
PGH=$(url_part "$DATABASE_URL" host 5432)
PGP=$(url_part "$DATABASE_URL" port 5432)
RDH=$(url_part "$REDIS_URL" host 6379)
RDP=$(url_part "$REDIS_URL" port 6379)

pg_bin() {  # initdb/pg_ctl from PATH, else from Debian's versioned directory
  if command -v "$1" >/dev/null; then command -v "$1"; return; fi
  ls -d /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n1
}
as_postgres=()
if [ "$(id -u)" = 0 ]; then as_postgres=(runuser -u postgres --); fi  # PostgreSQL refuses root

started_pg=""
started_redis=""

pg_answers() { pg_isready -q -h "$PGH" -p "$PGP" 2>/dev/null; }
redis_answers() { redis-cli -h "$RDH" -p "$RDP" ping >/dev/null 2>&1; }

start_postgres() {
  local data="$state/postgres"
  echo "services: PostgreSQL does not answer on $PGH:$PGP; starting a private one in $data" >&2
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ ${#as_postgres[@]} -eq 0 ] || chown postgres "$state" "$data"
    "${as_postgres[@]}" "$(pg_bin initdb)" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  "${as_postgres[@]}" "$(pg_bin pg_ctl)" -D "$data" -l "$state/postgres.log" -w \
    -o "-p $PGP -k $data -c listen_addresses=$PGH" start >/dev/null
  started_pg=$data
}

start_redis() {
  echo "services: Redis does not answer on $RDH:$RDP; starting a private one" >&2
  redis-server --daemonize yes --bind "$RDH" --port "$RDP" --save "" --appendonly no \
    --dir "$state" --logfile "$state/redis.log" --pidfile "$state/redis.pid"
  for _ in $(seq 1 50); do redis_answers && break; sleep 0.1; done
  started_redis=$state/redis.pid
}

stop_started() {
  if [ -n "$started_pg" ]; then
    "${as_postgres[@]}" "$(pg_bin pg_ctl)" -D "$started_pg" -m fast -w stop >/dev/null || true
  fi
  if [ -n "$started_redis" ] && [ -f "$started_redis" ]; then
    kill "$(cat "$started_redis")" 2>/dev/null || true
  fi
}

pg_answers || start_postgres
redis_answers || start_redis
pg_answers || { echo "services: PostgreSQL still does not answer on $PGH:$PGP" >&2; exit 1; }
redis_answers || { echo "services: Redis still does not answer on $RDH:$RDP" >&2; stop_started; exit 1; }

case "$mode" in
  up) ;;
  run)
    trap stop_started EXIT
    status=0
    "$@" || status=$?
    exit "$status"
    ;;
  *) echo "services: unknown mode $mode" >&2; exit 2 ;;
esac
