#!/usr/bin/env bash
# Install finemoe, then run the whole recipe at a tiny size (see launch/quickstart.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m launch.quickstart "$@"
