#!/usr/bin/env bash
# Install the Ceph RADOS Gateway (a real S3 server) from Debian's packages.
# Idempotent: does nothing when radosgw, ceph-mon and ceph-osd are already there.
# Used by CI before the fleet integration tests; needs root (or sudo).
set -euo pipefail
need=()
for bin in radosgw radosgw-admin ceph-mon ceph-osd ceph monmaptool; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "rgw: already installed ($(ceph --version | cut -d' ' -f1-3))"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends ceph-mon ceph-osd radosgw ceph-common
echo "rgw: installed ($(ceph --version | cut -d' ' -f1-3))"
