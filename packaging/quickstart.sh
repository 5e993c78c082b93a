#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a mounted workspace on the embedded store:
#   bash packaging/quickstart.sh [MOUNTPOINT] [STORE_DIR]
# as root, or as a user with sudo (it re-runs itself through sudo; `sudo bash ...` works too).
# Installs wsfs with packaging/install.sh (the Debian packages it needs, a venv in /opt/wsfs or
# $WSFS_PREFIX, /usr/local/bin/wsfs and the mount helpers), creates the workspace if it does not
# exist, and mounts it (default: /workspace on file:///var/lib/wsfs/store).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOUNTPOINT="${1:-/workspace}"
STORE_DIR="${2:-/var/lib/wsfs/store}"

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || {
    echo "quickstart: run as root: installing packages and mounting need it, and this machine has no sudo" >&2
    exit 1
  }
  exec sudo -- env ${PYTHON:+PYTHON="$PYTHON"} ${WSFS_PREFIX:+WSFS_PREFIX="$WSFS_PREFIX"} \
    bash "$here/quickstart.sh" "$MOUNTPOINT" "$STORE_DIR"
fi
bash "$here/install.sh"
wsfs="${WSFS_PREFIX:-/opt/wsfs}/bin/wsfs"

mkdir -p "$MOUNTPOINT" "$STORE_DIR"
"$wsfs" mount --init "file://$STORE_DIR" "$MOUNTPOINT"
echo "wsfs: $MOUNTPOINT is mounted on file://$STORE_DIR; stop it with: wsfs unmount $MOUNTPOINT"
