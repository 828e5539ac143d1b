#!/bin/sh
# First start (empty $PGDATA): initdb, then the database and user for Orthanc, through the
# local socket only. Every start: the passwords of the roles follow the environment (a password
# changed in .env takes effect at the next start), and the database of the service's own
# records (POSTGRES_RECORDS_DB, owned by POSTGRES_RECORDS_USER, both "triage" by default) is
# created when POSTGRES_RECORDS_PASSWORD is set and it is missing; then postgres runs in the
# foreground as PID 1, listening on all addresses with password (SCRAM) authentication. Extra
# arguments are passed to postgres.
set -eu
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
fi
if [ -n "${POSTGRES_RECORDS_PASSWORD_FILE:-}" ]; then
    POSTGRES_RECORDS_PASSWORD=$(cat "$POSTGRES_RECORDS_PASSWORD_FILE")
fi
POSTGRES_RECORDS_USER=${POSTGRES_RECORDS_USER:-triage}
POSTGRES_RECORDS_DB=${POSTGRES_RECORDS_DB:-triage}
# Placeholders (what an example file or a tutorial would hold) are refused at every start.
for password in "${POSTGRES_PASSWORD:-}" "${POSTGRES_RECORDS_PASSWORD:-}"; do
    case "$(printf %s "$password" | tr '[:upper:]' '[:lower:]')" in
        changeme|change-me|password|secret|postgres|orthanc|triage)
            echo "postgres: a password is a placeholder; set a real one" >&2
            exit 1 ;;
    esac
done
case "$POSTGRES_USER$POSTGRES_DB$POSTGRES_RECORDS_USER$POSTGRES_RECORDS_DB" in
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

# Every start, on the local socket only: passwords as in the environment, the records database.
sq() { printf %s "$1" | sed "s/'/''/g"; }
pg_ctl --pgdata="$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
{
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        printf '%s\n' "ALTER ROLE \"$POSTGRES_USER\" PASSWORD '$(sq "$POSTGRES_PASSWORD")';"
    fi
    if [ -n "${POSTGRES_RECORDS_PASSWORD:-}" ]; then
        echo "SELECT 'CREATE ROLE \"$POSTGRES_RECORDS_USER\" LOGIN' WHERE NOT EXISTS"
        echo "  (SELECT 1 FROM pg_roles WHERE rolname = '$POSTGRES_RECORDS_USER') \\gexec"
        printf '%s\n' \
            "ALTER ROLE \"$POSTGRES_RECORDS_USER\" PASSWORD '$(sq "$POSTGRES_RECORDS_PASSWORD")';"
        echo "SELECT 'CREATE DATABASE \"$POSTGRES_RECORDS_DB\" OWNER \"$POSTGRES_RECORDS_USER\"'"
        echo "  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$POSTGRES_RECORDS_DB') \\gexec"
    fi
} | psql -v ON_ERROR_STOP=1 -q -U postgres -d postgres >/dev/null
pg_ctl --pgdata="$PGDATA" -m fast -w stop >/dev/null
exec postgres -D "$PGDATA" "$@"
