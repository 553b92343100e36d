#!/usr/bin/env bash
# Set up, build the synthetic demo datastore, and serve the CTV model on http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# SYNTHETIC phantoms (held-out seeds): 8 studies, the first 3 with a CTV label to start from.
.venv/bin/python -m ctv_datastore.build --out datastore/demo --seeds 9100-9107 --labelled 9100-9102
# Research mode: the shipped demo weights are the first version; training publishes new versions under
# the datastore's data folder (datastore/demo/.ctv), never over the shipped file (docs/clinical.md).
# Two malloc arenas: inference threads otherwise each grow their own (peak RSS under 10 clients
# 1205 -> 893 MB, same latency; docs/reliability.md).
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
PATH="$PWD/.venv/bin:$PATH" exec monailabel start_server --app apps/ctv_app --studies "${STUDIES:-datastore/demo}" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
