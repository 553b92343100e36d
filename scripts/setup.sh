#!/usr/bin/env bash
# Set up everything the server and the tests need, on a fresh Debian machine or this one.
# Idempotent: a second run only checks. Creates .venv at the repo root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --tests: also what the tests need. --deps-only: the packages without this project (the container
# image's dependency layer, cached apart from the source).
# Debian packages (scripts/apt-packages.txt; with --tests also scripts/apt-packages-test.txt),
# installed only when one is missing.
lists=(scripts/apt-packages.txt)
[[ "${1:-}" == "--tests" ]] && lists+=(scripts/apt-packages-test.txt)
missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done < <(cat "${lists[@]}")
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "Installing Debian packages: ${missing[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 12), sys.version' \
  || { echo "need Python 3.10-3.12 as \$PYTHON (have $("$PYTHON" --version 2>&1))"; exit 1; }
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv

# Reinstall only when the dependency files change (the tests' own, with --tests, stamped apart).
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
stamp=.venv/.ctv-deps-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  # CPU torch first and pinned: any other resolution pulls gigabytes of CUDA wheels.
  # TORCH_INDEX_URL picks where it comes from (docker: the PyTorch CPU index); TORCH_WHEEL, a wheel file.
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_WHEEL:-torch==2.13.0}"
  "${pip[@]}" -c constraints.txt -r requirements.txt
  # Without its declared deps: they include sam2 (builds against a CUDA torch) and torchvision.
  "${pip[@]}" --no-deps -c constraints.txt monailabel
  .venv/bin/python -m pip uninstall -y -q ctv-label 2>/dev/null || true  # reinstalled below, as pyproject.toml now says
  rm -f .venv/.ctv-deps-*
  touch "$stamp"
fi
if [[ "${1:-}" == "--tests" ]]; then
  test_stamp=.venv/.ctv-test-deps-$(cat requirements-test.txt constraints.txt | sha256sum | cut -c1-16)
  if [[ ! -f "$test_stamp" ]]; then
    "${pip[@]}" -c constraints.txt -r requirements-test.txt
    # Without its declared opencv-python (GUI build, needs libGL): requirements-test.txt has the headless one.
    "${pip[@]}" --no-deps -c constraints.txt rt-utils
    rm -f .venv/.ctv-test-deps-*
    touch "$test_stamp"
  fi
fi
[[ "${1:-}" == "--deps-only" ]] && exit 0
.venv/bin/python -m pip show -q ctv-label >/dev/null 2>&1 || "${pip[@]}" --no-deps -e .
.venv/bin/python -c 'import monailabel, monai, torch, ctv_app.lib.networks' \
  || { echo "environment check failed"; exit 1; }
echo "environment ready: $(.venv/bin/python -c 'import monai, monailabel, torch; print("torch", torch.__version__, "monai", monai.__version__, "monailabel", monailabel.__version__)')"
