#!/bin/sh
# First start (empty $PGDATA): initdb, then the database and user for Orthanc, through the
# local socket only; then (every start) postgres in the foreground as PID 1, listening on all
# addresses with password (SCRAM) authentication. Extra arguments are passed to postgres.
set -eu
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
fi
# Placeholders (what an example file or a tutorial would hold) are refused at every start.
case "$(printf %s "${POSTGRES_PASSWORD:-}" | tr '[:upper:]' '[:lower:]')" in
    changeme|change-me|password|secret|postgres|orthanc)
        echo "postgres: POSTGRES_PASSWORD is a placeholder; set a real one" >&2
        exit 1 ;;
esac
case "$POSTGRES_USER$POSTGRES_DB" in
    *[!A-Za-z0-9_]*) echo "postgres: POSTGRES_USER and POSTGRES_DB: letters, digits and _ only" >&2
                     exit 1 ;;
esac

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) for the first start" >&2
        exit 1
    fi
    initdb --pgdata="$PGDATA" --username=postgres --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    {
        echo "listen_addresses = '*'"
        echo "password_encryption = 'scram-sha-256'"
        echo "unix_socket_directories = '/var/run/postgresql'"
    } >> "$PGDATA/postgresql.conf"
    {
        echo "local all all peer"
        echo "host all all 127.0.0.1/32 scram-sha-256"
        echo "host all all ::1/128 scram-sha-256"
        echo "host all all 0.0.0.0/0 scram-sha-256"
        echo "host all all ::/0 scram-sha-256"
    } > "$PGDATA/pg_hba.conf"
    pg_ctl --pgdata="$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    # The password reaches psql as a variable (standard input), never on a command line.
    psql -v ON_ERROR_STOP=1 -q -U postgres -d postgres \
        -v user="$POSTGRES_USER" -v db="$POSTGRES_DB" <<SQL
\set pw '$(printf %s "$POSTGRES_PASSWORD" | sed "s/'/''/g")'
CREATE ROLE :"user" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"user";
SQL
    pg_ctl --pgdata="$PGDATA" -m fast -w stop >/dev/null
    echo "postgres: initialised $PGDATA with database $POSTGRES_DB owned by $POSTGRES_USER"
fi
exec postgres -D "$PGDATA" "$@"
