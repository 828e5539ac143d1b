#!/bin/sh
# Healthy when Redis answers PING with the password (redis-cli reads REDISCLI_AUTH).
if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    REDIS_PASSWORD=$(cat "$REDIS_PASSWORD_FILE")
fi
REDISCLI_AUTH=${REDIS_PASSWORD:-} exec sh -c 'redis-cli -h 127.0.0.1 ping | grep -q PONG'
