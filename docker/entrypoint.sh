#!/usr/bin/env bash
# The container's server: access control ON (lib/security.py). Users come from $CTV_AUTH_FILE
# (default $CTV_DATA/users.json) or $CTV_AUTH_TOKENS. On a first start with neither, a user
# 'admin' is created and its token printed once: add the department's users with
#   python -m ctv_app.lib.security add-user NAME annotator|reviewer|admin $CTV_AUTH_FILE
# State (users, audit log, page cases, model versions, commissioning, monitoring) lives under $CTV_DATA:
# mount a volume there; replicas behind nginx share it (docker/compose.yml). STUDIES: a folder or a
# DICOMweb URL. Clinical mode is on (docs/clinical.md): nothing is served until a physicist approves a
# commissioned version; CTV_CLINICAL_MODE=false for a research deployment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA="${CTV_DATA:-/data}"
mkdir -p "$DATA" /tmp/ctv-logs  # apps/ctv_app/logs points there (docker/Dockerfile)
# Replicas share $DATA: the first to start creates the users file, once.
exec 9>"$DATA/.first-start.lock"
flock 9
if [[ -z "${CTV_AUTH_TOKENS:-}" ]]; then
  export CTV_AUTH_FILE="${CTV_AUTH_FILE:-$DATA/users.json}"
  if [[ ! -s "$CTV_AUTH_FILE" ]]; then
    token=$(python -m ctv_app.lib.security add-user admin admin "$CTV_AUTH_FILE")
    echo "first start: user 'admin' (role admin) added to $CTV_AUTH_FILE; its token, shown only now: $token"
  fi
fi
flock -u 9
exec 9>&-
export CTV_AUDIT_LOG="${CTV_AUDIT_LOG:-$DATA/audit.jsonl}"
# Two malloc arenas: inference threads otherwise each grow their own (peak RSS under 10 clients
# 1205 -> 893 MB, same latency; docs/reliability.md).
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
# Inside a container the server listens on all interfaces of the container's own network.
exec monailabel start_server --app apps/ctv_app --studies "${STUDIES:-/studies}" \
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
  --conf cases_path "$DATA/cases" --conf data_dir "$DATA" --conf clinical_mode "${CTV_CLINICAL_MODE:-true}" "$@"
