#!/bin/bash
# Container entrypoint: mount the workspace, prepare /data, run the notebook command ("$@"), and
# on SIGTERM upload every byte to the store while stopping it, then unmount (`wsfs run --help`).
#
# Configuration comes from the environment; nothing secret ever goes on a command line. wsfs
# itself reads every mount option's variable (WSFS_CACHE_DIR, WSFS_CACHE_SIZE, WSFS_DIRTY_LIMIT,
# WSFS_FLUSH_DELAY, WSFS_UNMOUNT_TIMEOUT, WSFS_ENDPOINT_URL, WSFS_REGION, WSFS_INIT=1,
# WSFS_OWNER, WSFS_FRAMEWORK, WSFS_LABELS, WSFS_CREDENTIALS_FILE, ...: the table in
# docs/user-guide.md#options, or `wsfs mount --help`); this script adds those of the container:
#   WSFS_STORE              s3://BUCKET[/PREFIX] or file:///DIR (required)
#   WSFS_MOUNTPOINT         where to mount it (default /workspace)
#   WSFS_DATA_DIR           plain local scratch directory (default /data; empty: none)
#   WSFS_DATA_OWNER         UID:GID to chown the data dir to (default: WSFS_USER's, else left
#                           as it is)
#   WSFS_STOP_TIMEOUT       seconds the notebook gets after SIGTERM before SIGKILL (default 3;
#                           the upload starts at the SIGTERM, alongside)
#   WSFS_OPTIONS            extra mount options, comma-separated (allow_other,fsync=remote,...);
#                           like -o, they beat the variables above
#   WSFS_USER               the user the command runs as (a name or uid in /etc/passwd): its
#                           uid, gid and groups, HOME, USER, LOGNAME and SHELL; the rest of the
#                           environment is kept (JUPYTER_TOKEN, CUDA_VISIBLE_DEVICES, PATH, ...).
#                           Unset: root, like wsfs itself (which mounts). WSFS_OWNER (the owner
#                           of a workspace WSFS_INIT=1 creates) defaults to this user
#   WSFS_VERBOSE            1: more log output
# Credentials, either
#   AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) in the environment, or
#   WSFS_CREDENTIALS_FILE   an AWS shared-credentials file, mode 0600 (WSFS_PROFILE or
#                           AWS_PROFILE picks a profile)
# The notebook command does not inherit them (WSFS_KEEP_CREDENTIALS=1 to pass them on).
set -euo pipefail

if [ -z "${WSFS_STORE:-}" ]; then
    echo "wsfs-entrypoint: set WSFS_STORE to the workspace's store (s3://BUCKET/PREFIX)" >&2
    exit 2
fi
if [ $# -eq 0 ]; then
    echo "wsfs-entrypoint: no command to run; give the notebook command as the container's CMD" >&2
    exit 2
fi

if [ -n "${WSFS_USER:-}" ]; then
    # passwd: name:password:uid:gid:gecos:home:shell
    if ! IFS=: read -r user _ uid gid _ home shell < <(getent passwd "$WSFS_USER"); then
        echo "wsfs-entrypoint: WSFS_USER=$WSFS_USER is no user of this image; create it" \
             "(useradd) or fix WSFS_USER" >&2
        exit 2
    fi
    : "${WSFS_DATA_OWNER:=$uid:$gid}"
    export WSFS_OWNER="${WSFS_OWNER:-$uid:$gid}"  # read by wsfs itself
    # Not `setpriv --reset-env`: the notebook needs the container's environment. `wsfs run`
    # withholds the credentials from it.
    set -- setpriv --reuid="$uid" --regid="$gid" --init-groups \
        env HOME="$home" USER="$user" LOGNAME="$user" SHELL="${shell:-/bin/sh}" "$@"
fi

args=(run --mount "$WSFS_STORE" "${WSFS_MOUNTPOINT:-/workspace}" --data-dir "${WSFS_DATA_DIR-/data}")
[ -n "${WSFS_VERBOSE:-}" ] && [ "${WSFS_VERBOSE}" != 0 ] && args=(-v "${args[@]}")
[ -n "${WSFS_DATA_OWNER:-}" ] && args+=(--data-owner "$WSFS_DATA_OWNER")
[ -n "${WSFS_STOP_TIMEOUT:-}" ] && args+=(--stop-timeout "$WSFS_STOP_TIMEOUT")
[ -n "${WSFS_OPTIONS:-}" ] && args+=(-o "$WSFS_OPTIONS")
case "${WSFS_KEEP_CREDENTIALS:-0}" in 1|yes|true) args+=(--keep-credentials) ;; esac

# exec: `wsfs run` becomes PID 1 (or this script's pid) and receives the platform's SIGTERM.
exec "${WSFS_BIN:-wsfs}" "${args[@]}" -- "$@"
