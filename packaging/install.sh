#!/usr/bin/env bash
# install.sh: install wsfs on Debian 12/13 (or Ubuntu), whole, into its own virtual environment.
#
#   bash packaging/install.sh                      from this checkout
#   bash packaging/install.sh dist/wsfs-*.whl      from a wheel (pip wheel --no-deps . -w dist)
#   bash packaging/install.sh --extras test        with optional extras (comma-separated)
#   bash packaging/install.sh --packages-only [PKG ...]   only the Debian packages (+ PKG ...)
#   bash packaging/install.sh --uninstall          remove what an install put in place
#
# As root, or as a user with sudo (it re-runs itself through sudo). Re-running upgrades.
# 1. the Debian packages the build and the mounts need, only those missing: fuse3 (fusermount3),
#    libfuse3-dev, pkg-config, gcc and libc6-dev (pyfuse3 has no binary wheel), and what the chosen
#    Python lacks: its headers (python3-dev) and venv/ensurepip (python3-venv);
# 2. a virtual environment in $WSFS_PREFIX (default /opt/wsfs) with wsfs and its dependencies,
#    never the system Python (PEP 668: Debian's python3 is externally managed);
# 3. $WSFS_BIN_DIR/wsfs (default /usr/local/bin) and the mount(8) helpers $WSFS_SBIN_DIR/
#    {mount.fuse.wsfs,mount.wsfs,umount.fuse.wsfs} (default /sbin, where mount(8) looks; on a
#    merged-/usr Debian /sbin is /usr/sbin), each a link into the venv;
# 4. the systemd unit wsfs@.service in $WSFS_UNIT_DIR (default /usr/local/lib/systemd/system),
#    the docs in $WSFS_PREFIX/share/doc/wsfs (README.md, docs/*.md) and the example mount unit in
#    its examples/, the units' ExecStart= and Documentation= rewritten for $WSFS_PREFIX.
# PYTHON picks the interpreter the venv is made from (default python3, 3.11 or newer).
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(dirname "$here")
PREFIX=${WSFS_PREFIX:-/opt/wsfs}
BIN_DIR=${WSFS_BIN_DIR:-/usr/local/bin}
SBIN_DIR=${WSFS_SBIN_DIR:-/sbin}
UNIT_DIR=${WSFS_UNIT_DIR:-/usr/local/lib/systemd/system}
DOC_DIR=$PREFIX/share/doc/wsfs
# The prefix the unit files in the repository are written for; rendered to $PREFIX.
DEFAULT_PREFIX=/opt/wsfs

mode=install extras="" package="" extra_pkgs=()
while [ $# -gt 0 ]; do
  case $1 in
    --extras) [ $# -ge 2 ] || die "--extras needs a value, e.g. --extras test"; extras=$2; shift 2;;
    --extras=*) extras=${1#--extras=}; shift;;
    --packages-only) mode=packages; shift; extra_pkgs=("$@"); break;;
    --uninstall) mode=uninstall; shift;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    -*) die "unknown option $1 (see --help)";;
    *) [ -z "$package" ] || die "give one wheel or source directory, not several"
       package=$1; shift;;
  esac
done

# The interpreter, resolved now: sudo resets PATH, and a pyenv shim would pick another Python.
PY=$(command -v "${PYTHON:-python3}") || die "${PYTHON:-python3} not found; install python3 (apt-get install python3)"
PY=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "wsfs needs Python 3.11 or newer; $PY is $("$PY" -V 2>&1); name another with PYTHON="

# Run a command as root: directly, or through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo -- "$@"
  else die "run as root: installing Debian packages needs it, and this machine has no sudo"
  fi
}

if [ "$mode" != packages ] && [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null \
    || die "run as root: installing into $PREFIX, $BIN_DIR and $SBIN_DIR needs it, and this machine has no sudo"
  args=()
  [ "$mode" = install ] || args+=("--$mode")
  [ -z "$extras" ] || args+=(--extras "$extras")
  [ -z "$package" ] || args+=("$(realpath "$package")")
  exec sudo -- env PYTHON="$PY" WSFS_PREFIX="$PREFIX" WSFS_BIN_DIR="$BIN_DIR" \
    WSFS_SBIN_DIR="$SBIN_DIR" WSFS_UNIT_DIR="$UNIT_DIR" bash "$here/install.sh" "${args[@]}"
fi

# The Debian packages that are missing: the build's, the mounts', and what $PY lacks.
missing_packages() {
  local pkg py_pkg ver
  for pkg in fuse3 libfuse3-dev pkg-config gcc libc6-dev "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || echo "$pkg"
  done
  # Debian's default python3 comes as python3-venv/-dev, another Debian python3.X as python3.X-*.
  ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$PY" = "$(realpath /usr/bin/python3 2>/dev/null)" ]; then py_pkg=python3
  else py_pkg=python$ver
  fi
  "$PY" -c 'import ensurepip, venv' 2>/dev/null || echo "$py_pkg-venv"
  "$PY" -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || echo "$py_pkg-dev"
}

install_packages() {
  local missing
  mapfile -t missing < <(missing_packages "$@")
  [ ${#missing[@]} -gt 0 ] || return 0
  command -v apt-get >/dev/null \
    || die "install ${missing[*]} with this system's package manager (apt-get not found), then re-run"
  case $PY in
    /usr/*) ;;
    *) for pkg in "${missing[@]}"; do
         case $pkg in python*-venv|python*-dev)
           die "$PY lacks ${pkg#python*-} support, and it is not a Debian Python: name one that has it with PYTHON=, or use /usr/bin/python3";;
         esac
       done;;
  esac
  echo "install.sh: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

uninstall() {
  local name
  for name in "$BIN_DIR/wsfs" "$SBIN_DIR/mount.fuse.wsfs" "$SBIN_DIR/mount.wsfs" \
              "$SBIN_DIR/umount.fuse.wsfs"; do
    case $(readlink "$name" 2>/dev/null) in "$PREFIX"/*) rm -f "$name";; esac
  done
  rm -f "$UNIT_DIR/wsfs@.service"
  rm -rf "$PREFIX"
  echo "install.sh: removed wsfs from $PREFIX (the caches in /var/cache/wsfs and the stores stay)"
}

# The venv: made once, made again if its Python is gone (e.g. after a Python upgrade).
make_venv() {
  if [ ! -x "$PREFIX/bin/python" ] || ! "$PREFIX/bin/python" -c '' 2>/dev/null \
     || ! "$PREFIX/bin/python" -m pip --version >/dev/null 2>&1; then
    "$PY" -m venv --clear "$PREFIX"
  fi
}

# wsfs into the venv. A checkout is built into a wheel from a copy of it, so that no build/ or
# egg-info owned by root is left in the user's tree, and no stale build/ leaks old modules in.
install_wsfs() {
  local wheel
  if [ -z "$package" ] || [ -d "$package" ]; then
    local tree=${package:-$src}
    [ -f "$tree/pyproject.toml" ] || die "$tree is not a wsfs source tree (no pyproject.toml)"
    mkdir "$work/src"
    cp -r "$tree/pyproject.toml" "$tree/README.md" "$tree/wsfs" "$work/src/"
    find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
    "$PREFIX/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
      -w "$work/dist" "$work/src"
    wheel=$(echo "$work"/dist/wsfs-*.whl)
  else
    [ -f "$package" ] || die "$package: no such file (give a wsfs-*.whl or a source directory)"
    wheel=$(realpath "$package")
  fi
  "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --upgrade \
    "$wheel${extras:+[$extras]}"
  # The same version number again (a rebuilt checkout) must still replace the installed files.
  "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall \
    "$wheel"
}

install_links() {
  mkdir -p "$BIN_DIR" "$SBIN_DIR"
  ln -sfn "$PREFIX/bin/wsfs" "$BIN_DIR/wsfs"
  PYTHON="$PREFIX/bin/python" SBIN_DIR="$SBIN_DIR" sh "$here/install-mount-helper.sh" >/dev/null
}

# The units and the docs they name, rendered for $PREFIX.
install_units_and_docs() {
  mkdir -p "$DOC_DIR/docs" "$DOC_DIR/examples" "$UNIT_DIR"
  cp "$src/README.md" "$DOC_DIR/"
  cp "$src"/docs/*.md "$DOC_DIR/docs/"
  render() { sed "s|$DEFAULT_PREFIX/|$PREFIX/|g" "$1" >"$2.tmp" && mv "$2.tmp" "$2"; }
  render "$here/systemd/wsfs@.service" "$UNIT_DIR/wsfs@.service"
  render "$here/systemd/workspace.mount" "$DOC_DIR/examples/workspace.mount"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || echo "install.sh: warning: systemctl daemon-reload failed" >&2
  fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
case $mode in
  packages) install_packages "${extra_pkgs[@]}"; exit 0;;
  uninstall) uninstall; exit 0;;
esac
install_packages
make_venv
install_wsfs
install_links
install_units_and_docs
echo "install.sh: wsfs $("$PREFIX/bin/wsfs" --version 2>/dev/null | awk '{print $NF}') installed in $PREFIX;" \
  "$BIN_DIR/wsfs, $SBIN_DIR/mount.fuse.wsfs and $UNIT_DIR/wsfs@.service point at it"
