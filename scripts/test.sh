#!/usr/bin/env bash
# Install fedgen and what its tests need (the headless browser the report and review-kit pages
# are checked in), lint, and run the whole test suite (what CI runs) on two pytest-xdist workers:
# many tests wait on subprocesses, so two workers halve the wall time on two cores. Extra
# arguments go to pytest, e.g. `bash scripts/test.sh -m "not e2e and not slow"` for the fast
# loop, or `-n 0` to run in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation >/dev/null
  else
    echo "error: the tests need Chromium on PATH (Debian: apt-get install chromium fonts-liberation)" >&2
    exit 1
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -n 2 "$@"
