#!/usr/bin/env bash
# Set up and run the whole test suite (starts real servers: MONAI Label, Orthanc, Chromium).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --tests
# The container test's images, built while the network is still reachable (the Debian mirror, PyPI):
# for the whole suite, or when the container test is asked for.
if [[ $# -eq 0 || "$*" == *test_containers* ]]; then
  bash tests/containers/images.sh
fi
# Run the tests in a private network namespace holding only loopback, so the servers they start
# can be reached from nowhere else (Debian's Orthanc binds all interfaces). Needs root or user
# namespaces; otherwise the tests still bind 127.0.0.1 and Orthanc refuses remote access.
for ns in "unshare --net" "unshare --map-root-user --net"; do
  if $ns sh -c 'ip link set lo up' 2>/dev/null; then
    echo "tests run in a private network namespace ($ns)"
    exec $ns sh -c 'ip link set lo up && exec "$0" -m pytest "$@"' .venv/bin/python "$@"
  fi
done
echo "no private network namespace available: tests run on this host's loopback"
exec .venv/bin/python -m pytest "$@"
