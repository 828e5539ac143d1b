#!/bin/sh
# Runs the healthchecks of a compose project's containers every 2 s, for podman without
# systemd (podman then never runs them by itself, and `depends_on: condition: service_healthy`
# waits forever). Start it in the background before `docker-compose up`; stop it after `down`.
#   deploy/compose/healthcheck-loop.sh PROJECT &
# Needs CONTAINERS_CONF as for the podman service the compose client talks to.
set -u
project=${1:?usage: healthcheck-loop.sh COMPOSE_PROJECT}
while :; do
    for id in $(podman ps -q --filter "label=com.docker.compose.project=$project" 2>/dev/null); do
        podman healthcheck run "$id" >/dev/null 2>&1 &
    done
    wait
    sleep 2
done
