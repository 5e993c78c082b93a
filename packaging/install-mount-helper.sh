#!/bin/sh
# Install the mount(8)/umount(8) helpers for wsfs, so that fstab lines and `mount -t fuse.wsfs`
# work and `umount MOUNTPOINT` waits for the final upload:
#   /sbin/mount.fuse.wsfs   (type fuse.wsfs, the FUSE convention)
#   /sbin/mount.wsfs        (type wsfs)
#   /sbin/umount.fuse.wsfs  (umount of a fuse.wsfs mount: flush, unmount, wait for the daemon)
# each a symlink to the `mount.wsfs` console script of the Python that has wsfs installed.
#
#   sh packaging/install-mount-helper.sh              install (PYTHON=python3 by default)
#   sh packaging/install-mount-helper.sh --uninstall  remove the links
# SBIN_DIR (default /sbin) and PYTHON override the defaults.
set -eu

PYTHON="${PYTHON:-python3}"
SBIN_DIR="${SBIN_DIR:-/sbin}"
LINKS="mount.fuse.wsfs mount.wsfs umount.fuse.wsfs"

if [ "${1:-}" = "--uninstall" ]; then
    for name in $LINKS; do rm -f "$SBIN_DIR/$name"; done
    echo "removed the wsfs mount helpers from $SBIN_DIR"
    exit 0
fi

# The console script itself, not a wrapper such as a pyenv shim: mount(8) runs helpers with a
# minimal environment, in which shims may not find their Python.
scripts="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
target="$scripts/mount.wsfs"
if [ ! -x "$target" ]; then
    echo "install-mount-helper: $target not found; install wsfs into $PYTHON first" \
         "(bash packaging/install.sh)" >&2
    exit 1
fi
if ! command -v fusermount3 >/dev/null 2>&1; then
    echo "install-mount-helper: warning: fusermount3 not found; install fuse3" >&2
fi
for name in $LINKS; do
    ln -sfn "$target" "$SBIN_DIR/$name"
done
echo "installed $SBIN_DIR/{mount.fuse.wsfs,mount.wsfs,umount.fuse.wsfs} -> $target"
# mount(8) and umount(8) run helpers from /sbin only (util-linux 2.38 on Debian 12, 2.41 on 13;
# /sbin is /usr/sbin on a merged /usr). They also look in /sbin/fs.d and /sbin/fs, but only after
# /sbin/mount.fuse, which fuse3 installs and which would take a fuse.wsfs mount there first.
if [ "$(cd "$SBIN_DIR" && pwd -P)" != "$(cd /sbin && pwd -P)" ]; then
    echo "install-mount-helper: warning: mount(8) runs helpers from /sbin only, not from" \
         "$SBIN_DIR: fstab lines and \`mount -t fuse.wsfs\` will not find these" >&2
fi
