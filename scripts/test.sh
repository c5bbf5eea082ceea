#!/usr/bin/env bash
# Install finemoe with its dev tools (CPU torch) and run lint, type check and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
  || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]" "transformers==5.24.0"
ruff check .
ruff format --check .
mypy moe upcycle train data launch
DS_ACCELERATOR=cpu python -m pytest -q -x tests
