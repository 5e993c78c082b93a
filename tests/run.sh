#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
#   bash tests/run.sh            the default suite (what CI runs)
#   bash tests/run.sh -m smoke   the smoke tests (a few minutes; CI runs them on fresh machines)
#   bash tests/run.sh -m slow    the soak tests
# Extra arguments go to pytest. As root, or as a user with sudo: the Debian packages and pytest
# (the tests mount filesystems and need root) then go through sudo, the rest runs as the user.
#
# The Debian packages come from packaging/install.sh (what the build needs) plus the tools the
# tests call. The Python side goes into a virtual environment of the checkout, .venv (PYTHON
# picks the interpreter it is made from, default python3), with wsfs installed editable and its
# `test` extras: never the system Python (PEP 668), never the /opt/wsfs that install.sh makes
# for real use, and the console scripts (wsfs, mount.wsfs) run the code of this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

bash packaging/install.sh --packages-only git systemd util-linux procps strace

PY=$(command -v "${PYTHON:-python3}")
VENV=.venv
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  "$PY" -m venv --clear "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'

"$VENV/bin/python" -m ruff check wsfs tests
"$VENV/bin/python" -m mypy
# The tests mount filesystems: as a user with sudo, pytest runs as root (leaving no root-owned
# bytecode in the checkout); everything above ran as the user.
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
  exec sudo -- env PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
fi
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
