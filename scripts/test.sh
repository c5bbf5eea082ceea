#!/usr/bin/env bash
# Install finemoe with its dev tools, then lint, type-check and run the test suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
ruff check .
ruff format --check .
mypy cli moe upcycle train data launch
# two workers, each test file on one worker (module fixtures run their multi-process launches once)
DS_ACCELERATOR=cpu python -m pytest -q -n 2 --dist loadfile tests
