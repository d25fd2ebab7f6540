#!/usr/bin/env bash
# Run prolip's test suite (sets up .venv and data first; no network access is used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
.venv/bin/mkdocs build --strict -d build/site  # no --quiet: it hides the warnings --strict counts
.venv/bin/python -m pytest -q "$@"
