#!/bin/sh
# Builds the four images of the stack with podman, from deploy/, without any container registry:
#   triage:0.1.0           deploy/Dockerfile           API, workers, watcher
#   triage-orthanc:0.1.0   deploy/orthanc/Dockerfile   Orthanc + DICOMweb, GDCM, PostgreSQL plugins
#   triage-redis:0.1.0     deploy/redis/Dockerfile     Redis, append-only, password required
#   triage-postgres:0.1.0  deploy/postgres/Dockerfile  PostgreSQL 15 (Orthanc's index)
# each also tagged `latest`. Every Dockerfile starts from debian:bookworm-slim. When that image
# is not in podman's store and no registry answers, it is made here with mmdebstrap from the
# host's apt sources (and trusts the host's extra CA certificates), under the official name.
# Idempotent: a second run reuses the base and podman's layer cache. Run as root from anywhere.
#
#   deploy/build-images.sh            # all images
#   deploy/build-images.sh redis      # only some (triage, orthanc, redis, postgres)
#   NO_CACHE=1 deploy/build-images.sh # cold build of the images (the base is kept)
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)
BASE=debian:bookworm-slim
SUITE=bookworm

now() { date +%s; }
START=$(now)
step() { printf '==> %s\n' "$*"; }
took() { printf '    %s: %ss\n' "$1" "$(( $(now) - $2 ))"; }

# 1. Tools, from Debian (docker-compose is for driving the stack against `podman system service`).
missing=""
# iptables: netavark needs it for the bridge networks (build steps included).
for pkg in podman runc mmdebstrap uidmap slirp4netns netavark aardvark-dns iptables docker-compose; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    t=$(now); step "installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    took "apt-get install" "$t"
fi

# 2. Podman settings: runc, cgroupfs, explicit limits no higher than the host allows.
CONF="$HERE/containers.conf"
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt 20000 ]; then
    # This host allows fewer open files: a copy of the settings with its hard limit.
    CONF=$(mktemp /tmp/triage-containers.XXXXXX.conf)
    sed "s/nofile=20000:20000/nofile=$hard:$hard/" "$HERE/containers.conf" > "$CONF"
fi
export CONTAINERS_CONF="$CONF"

# 3. The base image.
if podman image exists "$BASE"; then
    step "$BASE: present"
else
    t=$(now)
    step "$BASE: trying the registry"
    if timeout 30 podman pull -q "docker.io/library/$BASE" >/dev/null 2>&1; then
        took "pull" "$t"
    else
        step "$BASE: no registry; building it with mmdebstrap from the host's apt sources"
        # The host's Debian mirrors (deb822 or one-line sources), for the base's own apt.
        mirrors=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
                      | sed -n 's/^URIs: *//p' | tr ' ' '\n' | grep -v '^$' || true)
        debian=$(printf '%s\n' $mirrors | grep -v -- '-security' | head -n 1)
        security=$(printf '%s\n' $mirrors | grep -- '-security' | head -n 1)
        if [ -z "$debian" ] && [ -f /etc/apt/sources.list ]; then
            debian=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)
            security=$(awk '$1 == "deb" && $3 ~ /security/ {print $2; exit}' /etc/apt/sources.list)
        fi
        debian=${debian:-http://deb.debian.org/debian}
        security=${security:-http://deb.debian.org/debian-security}
        work=$(mktemp -d /tmp/triage-base.XXXXXX)
        # Where HTTPS passes a TLS-inspecting proxy, the image must trust the host's extra CAs
        # (pip and npm in the builds). /usr/local/share/ca-certificates is empty elsewhere.
        cas=""
        for crt in /usr/local/share/ca-certificates/*.crt; do
            [ -f "$crt" ] && cas="$cas $crt"
        done
        hook='true'
        if [ -n "$cas" ]; then
            hook="mkdir -p \"\$1/usr/local/share/ca-certificates\" && cp$cas \"\$1/usr/local/share/ca-certificates/\" && chroot \"\$1\" update-ca-certificates"
        fi
        # Slim like the official image: no documentation, no apt lists, and apt deletes the
        # downloaded packages after installing them (the official image's docker-clean).
        mmdebstrap --variant=minbase --include=ca-certificates \
            --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --customize-hook="$hook" \
            --customize-hook='printf "%s\n" "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };" "APT::Update::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true\"; };" "Dir::Cache::pkgcache \"\"; Dir::Cache::srcpkgcache \"\";" > "$1/etc/apt/apt.conf.d/docker-clean"' \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
            "$SUITE" "$work/base.tar" \
            "deb $debian $SUITE main" "deb $debian $SUITE-updates main" \
            "deb $security $SUITE-security main"
        podman import --change 'CMD ["bash"]' "$work/base.tar" "$BASE" >/dev/null
        rm -rf "$work"
        took "mmdebstrap + import" "$t"
    fi
fi

# 4. The images, in order.
cache=""
[ "${NO_CACHE:-}" = 1 ] && cache="--no-cache"
build() {  # name dockerfile
    t=$(now)
    step "building $1:$VERSION"
    # --format docker keeps HEALTHCHECK (the OCI format drops it).
    podman build $cache --format docker --pull=never \
        -f "$2" -t "$1:$VERSION" -t "$1:latest" "$ROOT"
    took "$1" "$t"
}
targets=${*:-triage orthanc redis postgres}
for target in $targets; do
    case "$target" in
        triage)   build triage "$HERE/Dockerfile" ;;
        orthanc)  build triage-orthanc "$HERE/orthanc/Dockerfile" ;;
        redis)    build triage-redis "$HERE/redis/Dockerfile" ;;
        postgres) build triage-postgres "$HERE/postgres/Dockerfile" ;;
        *) echo "unknown image: $target (triage, orthanc, redis, postgres)" >&2; exit 2 ;;
    esac
done

podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
    | grep -E "^(localhost/)?(triage[a-z-]*:$VERSION|$BASE)" || true
took "total" "$START"
