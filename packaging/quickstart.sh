#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a mounted workspace on the embedded store:
#   sudo bash packaging/quickstart.sh [MOUNTPOINT] [STORE_DIR]
# Installs fuse3, libfuse3-dev, pkg-config and wsfs, creates the workspace if it does not exist,
# and mounts it (default: /workspace on file:///var/lib/wsfs/store).
set -euo pipefail
cd "$(dirname "$0")/.."
MOUNTPOINT="${1:-/workspace}"
STORE_DIR="${2:-/var/lib/wsfs/store}"

if [ "$(id -u)" -ne 0 ]; then
  echo "quickstart: run as root (sudo): mounting and installing packages need it" >&2
  exit 1
fi
missing=()
for pkg in fuse3 libfuse3-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
PY="${PYTHON:-python3}"
"$PY" -m pip install -q --disable-pip-version-check .

mkdir -p "$MOUNTPOINT" "$STORE_DIR"
"$PY" -m wsfs mount --init "file://$STORE_DIR" "$MOUNTPOINT"
echo "wsfs: $MOUNTPOINT is mounted on file://$STORE_DIR; stop it with: wsfs unmount $MOUNTPOINT"
