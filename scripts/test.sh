#!/usr/bin/env bash
# Install finemoe with its dev tools, then lint, type-check and run the test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
ruff check .
ruff format --check .
mypy cli moe upcycle train data launch
DS_ACCELERATOR=cpu python -m pytest -q tests
