#!/bin/bash
# nginx stand-in: the official image's template step (only variables that are set), then nginx.
set -euo pipefail
vars=$(printf '${%s} ' $(env | cut -d= -f1))
for t in /etc/nginx/templates/*.template; do
  [[ -e "$t" ]] || continue
  out=/etc/nginx/conf.d/$(basename "$t" .template)
  envsubst "$vars" < "$t" > "$out"
  echo "entrypoint: $t -> $out"
done
exec "$@"
