#!/bin/sh
# Restores a backup made by deploy/backup.sh into a stack that has never run: its volumes must
# not exist yet (a new server, or after `down -v` once you are sure). It checks the backup's
# SHA256SUMS, creates the stack's containers and volumes without starting them, unpacks
# Redis's append-only file and Orthanc's storage into their volumes, starts PostgreSQL alone
# (it initialises itself with TRIAGE_POSTGRES_PASSWORD from .env) and loads the dump. Then
# start the stack as usual; every service finds its data where it left it.
#
#   COMPOSE_PROJECT_NAME=triage deploy/restore.sh /srv/backup/triage-2026-11-30
#   docker compose up -d --scale worker=3
#
# Run it from the directory of docker-compose.yml (and .env). COMPOSE_PROJECT_NAME is the
# stack's project name (by default compose uses the directory's name); COMPOSE is the compose
# command (default `docker compose`) and ENGINE the container command (default `docker`;
# `podman` works the same).
set -eu
dir=${1:?usage: COMPOSE_PROJECT_NAME=NAME deploy/restore.sh DIRECTORY}
project=${COMPOSE_PROJECT_NAME:?set COMPOSE_PROJECT_NAME to the project name of the stack}
export COMPOSE_PROJECT_NAME
COMPOSE=${COMPOSE:-docker compose}
ENGINE=${ENGINE:-docker}

(cd "$dir" && sha256sum --check --quiet SHA256SUMS) || {
    echo "restore: $dir does not match its SHA256SUMS" >&2; exit 1; }
if [ -n "$($ENGINE ps -aq --filter "label=com.docker.compose.project=$project")" ]; then
    echo "restore: the stack $project has containers; restore into a stack that never ran" >&2
    exit 1
fi
for volume in postgres-data orthanc-storage redis-data; do
    if $ENGINE volume inspect "${project}_$volume" >/dev/null 2>&1; then
        echo "restore: volume ${project}_$volume exists; restore only into new volumes" >&2
        exit 1
    fi
done

$COMPOSE up --no-start

container() {
    $ENGINE ps -aq --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}
into_volume() {  # service, directory in its container, tar file
    id=$(container "$1")
    format='{{range .Mounts}}{{if eq .Destination "'"$2"'"}}{{.Name}}{{end}}{{end}}'
    volume=$($ENGINE inspect -f "$format" "$id")
    image=$($ENGINE inspect -f '{{.Config.Image}}' "$id")
    [ -n "$volume" ] || { echo "restore: no volume at $2 in $1" >&2; exit 1; }
    # As the image's own user (the owner of the directory), without a network.
    $ENGINE run --rm -i --network none --entrypoint tar -v "$volume:$2" "$image" \
        -C "$2" -xf - < "$3"
    echo "restore: $1 $2 from $(basename "$3")"
}
into_volume redis /data "$dir/redis-aof.tar"
into_volume orthanc /var/lib/orthanc/db "$dir/orthanc-storage.tar"

$COMPOSE up -d --no-deps postgres
tries=0
until $COMPOSE exec -T postgres pg_isready -q -h 127.0.0.1 -U postgres >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 120 ] || { echo "restore: PostgreSQL did not start" >&2; exit 1; }
    sleep 1
done
$COMPOSE exec -T postgres pg_restore -U postgres -d orthanc --exit-on-error \
    < "$dir/postgres-orthanc.dump"
# The records database is created by PostgreSQL's start (POSTGRES_RECORDS_PASSWORD).
if [ -f "$dir/postgres-triage.dump" ]; then
    $COMPOSE exec -T postgres pg_restore -U postgres -d triage --exit-on-error \
        < "$dir/postgres-triage.dump"
fi
echo "restore: PostgreSQL loaded; start the stack: $COMPOSE up -d"
