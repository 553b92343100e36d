#!/usr/bin/env bash
# Set up and run the whole test suite (starts real server processes on loopback).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
