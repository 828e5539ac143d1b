#!/bin/sh
# Starts redis-server in the foreground with the append-only file in /data and a password.
# The password is passed on standard input (as configuration), never on the command line,
# so that `ps` does not show it. Extra arguments are passed to redis-server.
set -eu
if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    REDIS_PASSWORD=$(cat "$REDIS_PASSWORD_FILE")
fi
if [ -z "${REDIS_PASSWORD:-}" ]; then
    echo "redis: set REDIS_PASSWORD (or REDIS_PASSWORD_FILE); refusing to start without one" >&2
    exit 1
fi
case "$(printf %s "$REDIS_PASSWORD" | tr '[:upper:]' '[:lower:]')" in
    changeme|change-me|password|secret|redis|orthanc)
        echo "redis: REDIS_PASSWORD is a placeholder; set a real one" >&2; exit 1 ;;
esac
case "$REDIS_PASSWORD" in
    *[!A-Za-z0-9_-]*) echo "redis: REDIS_PASSWORD: use letters, digits, - and _ only" >&2; exit 1 ;;
esac
# A here-document, not a pipe: `exec` then replaces this shell, so redis-server is PID 1 and
# receives the container's SIGTERM (it then flushes the append-only file and exits).
exec redis-server - \
    --bind '* -::*' --port 6379 --protected-mode no --dir /data \
    --appendonly yes --appendfsync everysec --daemonize no --logfile '' "$@" <<CONFIG
requirepass $REDIS_PASSWORD
CONFIG
