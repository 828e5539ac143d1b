#!/usr/bin/env bash
# Installs the Debian 12 packages the local stack and the tests need, if any is missing.
# Idempotent: does nothing (and needs no network) when everything is present.
set -euo pipefail

packages=(
  orthanc orthanc-dicomweb orthanc-gdcm   # the DICOM store, DICOMweb and JPEG 2000 decoding
  redis-server                           # queues and the worklist index
  postgresql                             # the service's records (vigilance: outcomes, alerts)
  dcmtk                                  # storescu to send studies, dsrdump to read SRs
  wrk                                    # HTTP load in the benchmark (make bench)
  libpixelmed-java default-jre-headless  # Pixelmed's TID 1500 validator in the tests
  chromium                               # the browser the web-page tests drive (Playwright)
  make
)
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  packages+=(python3-venv)
fi
# npm installs the front-end packages of package-lock.json (Swagger UI for /docs); a machine
# that has Node.js and npm already keeps its own.
if ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

# kubectl renders the Kubernetes manifests in the tests (`kubectl kustomize`). Debian 12's
# kubernetes-client (1.20) is the oldest kustomize the manifests are written for; a machine that
# has a kubectl already (another package owning /usr/bin/kubectl) keeps its own.
if ! command -v kubectl >/dev/null 2>&1; then
  packages+=(kubernetes-client)
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (or with sudo) to install: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# The packages' init scripts must not start system-wide Orthanc, Redis and PostgreSQL on the
# ports the local stack uses: the project starts its own.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -q --no-install-recommends "${missing[@]}"
