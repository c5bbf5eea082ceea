#!/usr/bin/env bash
# Install finemoe (editable) with its dependencies into the active Python environment.
# CPU-only machines get the CPU build of torch; on a CUDA machine keep the torch you have and
# run launch/install_kernels.sh afterwards for the megablocks kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.11"
  else
    # the CPU wheel index when it is reachable (PyPI's Linux torch is the CUDA build); otherwise the
    # configured indexes (an offline mirror), without pip's retry back-off on every dependency
    if python -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=5)" \
        2>/dev/null; then
      python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    else
      python -m pip install -q "torch==2.13.0"
    fi
  fi
fi
python -m pip install -q -e ".[dev]" "transformers==5.24.0"
