#!/bin/sh
# Backs up a running compose stack into DIRECTORY: Redis's append-only file, dumps of
# PostgreSQL's two databases (Orthanc's index, the service's vigilance records) and Orthanc's
# storage (images and AI result SRs), with a SHA256SUMS file. The stack keeps running; nothing is stopped.
#
#   deploy/backup.sh /srv/backup/triage-$(date +%F)
#
# Run it from the directory of docker-compose.yml (and .env). COMPOSE is the compose command
# (default `docker compose`; e.g. COMPOSE="docker-compose -f /opt/triage/docker-compose.yml").
#
# Order matters: Redis first, then PostgreSQL, then the storage. Each copy then knows at least
# what the one before it knows: a study stored after the Redis copy is in the index and the
# storage, and after a restore the watcher, whose cursor comes from Redis, finds it in
# Orthanc's change log and queues it. The reverse order could leave worklist entries whose
# images are missing. Restore with deploy/restore.sh (deploy/README.md, "Backup and restore").
set -eu
dir=${1:?usage: deploy/backup.sh DIRECTORY}
COMPOSE=${COMPOSE:-docker compose}
mkdir -p "$dir"
chmod 700 "$dir"
umask 077

redis_cli() {  # the password stays inside the container (its REDIS_PASSWORD)
    $COMPOSE exec -T redis sh -c 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli --raw "$@"' sh "$@"
}

# 1. Redis: its append-only directory, with automatic rewrites held off during the copy
#    (a rewrite replaces the files being copied). A tail written during the copy may be cut
#    short; Redis loads a truncated last command (aof-load-truncated, on by default).
percentage=$(redis_cli CONFIG GET auto-aof-rewrite-percentage | sed -n 2p | tr -d '\r')
redis_cli CONFIG SET auto-aof-rewrite-percentage 0 >/dev/null
trap 'redis_cli CONFIG SET auto-aof-rewrite-percentage "${percentage:-100}" >/dev/null' EXIT
tries=0
while redis_cli INFO persistence | grep -q '^aof_rewrite_in_progress:1'; do
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || { echo "backup: Redis is still rewriting its AOF" >&2; exit 1; }
    sleep 1
done
# The last file grows while it is read (Redis appends every second): GNU tar then says "file
# changed as we read it" and exits 1, which is expected here; 2 is a real failure.
$COMPOSE exec -T redis sh -c \
    'tar --warning=no-file-changed -C /data -cf - appendonlydir; [ $? -le 1 ]' \
    > "$dir/redis-aof.tar"
redis_cli CONFIG SET auto-aof-rewrite-percentage "${percentage:-100}" >/dev/null
trap - EXIT

# 2. PostgreSQL: a consistent snapshot of Orthanc's index (pg_dump's own transaction), as the
#    superuser over the container's local socket.
$COMPOSE exec -T postgres pg_dump -U postgres --format=custom orthanc \
    > "$dir/postgres-orthanc.dump"
# The service's own records (AI vigilance): regulatory records, kept like the images.
$COMPOSE exec -T postgres pg_dump -U postgres --format=custom triage \
    > "$dir/postgres-triage.dump"

# 3. Orthanc's storage. Files are written once and never changed, so a copy taken while
#    Orthanc runs holds every file the index names (and perhaps a few newer ones).
# A file being written at this moment may be caught half-written (tar exits 1): the dump taken
# before does not name it, since Orthanc indexes a file only after writing it.
$COMPOSE exec -T orthanc sh -c \
    'tar --warning=no-file-changed -C /var/lib/orthanc/db -cf - .; [ $? -le 1 ]' \
    > "$dir/orthanc-storage.tar"

(cd "$dir" && sha256sum redis-aof.tar postgres-orthanc.dump postgres-triage.dump \
    orthanc-storage.tar > SHA256SUMS)
ls -l "$dir"
echo "backup: done in $dir"
