#!/usr/bin/env bash
# Build the images tests/test_containers.py runs, with podman, on a machine that reaches no container
# registry: a Debian bookworm base made with debootstrap, stand-ins for the Python, Orthanc and nginx
# images docker/compose.yml names, and the CTV image from docker/Dockerfile as a department builds it.
# Layers are cached by podman: a second run rebuilds only what changed. Run by scripts/test.sh before
# the tests enter their private network namespace (building needs the Debian mirror and PyPI).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
here=tests/containers
state=${CTV_CONTAINERS_STATE:-/var/tmp/ctv-containers}
mkdir -p "$state"
t0=$(date +%s)
step() { echo "container images: $1 ($(( $(date +%s) - t0 )) s)"; }

# Without systemd podman needs cgroupfs and a file event log. If a container still cannot start (a host
# that refuses runc's resource limits, without CAP_SYS_RESOURCE), then and only then podman runs
# through a wrapper that drops them (podman-host/runc-norlimit). The tests read the same $state/containers.conf.
rm -f "$state/containers.conf"
engine_conf() {  # $1: "wrapper" to run through runc-norlimit
  {
    printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    if [[ "${1:-}" == wrapper ]]; then
      printf 'runtime = "runc"\n[engine.runtimes]\nrunc = ["%s"]\n' "$PWD/$here/podman-host/runc-norlimit"
    fi
  } > "$state/containers.conf"
  export CONTAINERS_CONF="$state/containers.conf"
}
[[ -d /run/systemd/system ]] || engine_conf

base=localhost/ctv-test-debian:bookworm
if ! podman image exists "$base"; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  rm -rf "$state/rootfs"
  debootstrap --variant=minbase bookworm "$state/rootfs" "${mirror:-http://deb.debian.org/debian}" > "$state/debootstrap.log"
  tar -C "$state/rootfs" -c . | podman import - "$base" > /dev/null
  rm -rf "$state/rootfs"
  step "Debian base imported"
fi
if ! podman run --rm --network none "$base" true 2> "$state/run-check.log"; then
  engine_conf wrapper  # (crun also refuses some hybrid cgroup layouts; runc does not)
  podman run --rm --network none "$base" true || { cat "$state/run-check.log"; exit 1; }
  echo "container images: podman runs runc through $here/podman-host/runc-norlimit here ($(head -c 200 "$state/run-check.log"))"
fi

# The host's CPython (a self-contained prefix such as pyenv's), as python:3.11-slim has its own.
prefix=$(python3 -c 'import sys; print(sys.base_prefix)')
python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
[[ "$prefix" != /usr ]] || { echo "need a self-contained CPython 3.11 (not Debian's /usr) as python3"; exit 1; }
mkdir -p "$state/python"
cp "$here/python/Containerfile" "$state/python/"
# Only the interpreter and its standard library: not the host's own packages, tests or caches.
[[ -f "$state/python/python.tar.gz" ]] || tar -C "$prefix" -czf "$state/python/python.tar.gz" \
  --exclude='./lib/python3.11/site-packages/*' --exclude='./lib/python3.11/test' --exclude='__pycache__' \
  --exclude='./lib/python3.11/idlelib' --exclude='./lib/python3.11/tkinter' --exclude='./lib/python3.11/turtledemo' .
podman build -q --format docker -t localhost/ctv-test-python:3.11 "$state/python" > /dev/null
step "Python base"
podman build -q --format docker -t localhost/ctv-test-orthanc:bookworm "$here/orthanc" > /dev/null
podman build -q --format docker -t localhost/ctv-test-nginx:bookworm "$here/nginx" > /dev/null
step "Orthanc and nginx stand-ins"

# The CTV image, from this checkout. No PyTorch index here: the CPU wheel pip finds locally, and the
# CA bundle pip trusts, go in on a build volume (never into a layer).
mkdir -p "$state/build-extra"
ls "$state"/build-extra/torch-2.13.0*.whl > /dev/null 2>&1 \
  || python3 -m pip download -q --no-deps torch==2.13.0 -d "$state/build-extra"
wheel=$(basename "$(ls "$state"/build-extra/torch-2.13.0*.whl | head -1)")
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$state/build-extra/ca-bundle.crt"
podman build -q --format docker -f docker/Dockerfile -t localhost/ctv-label:latest \
  --build-arg BASE=localhost/ctv-test-python:3.11 --build-arg TORCH_INDEX_URL= \
  --build-arg TORCH_WHEEL="/build-extra/$wheel" --build-arg PIP_CERT=/build-extra/ca-bundle.crt \
  -v "$state/build-extra:/build-extra:ro" . > /dev/null
step "CTV image $(podman image inspect localhost/ctv-label:latest --format '{{.Size}}') bytes"
