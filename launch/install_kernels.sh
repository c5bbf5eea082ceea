#!/usr/bin/env bash
# Build and install the CUDA expert kernels (grouped_gemm 0.3.0, megablocks 0.10.0) for the local
# CUDA toolkit and the already-installed torch, without letting pip touch torch.
#
#   bash launch/install_kernels.sh              # sdists from PyPI
#   bash launch/install_kernels.sh DIR          # offline: sdists (and wheels) from DIR
#
# Why not `pip install megablocks`: 0.10.0 pins torch==2.7.0 and numpy<2.1, so pip would replace
# the user's torch. And on CUDA 13 its csrc/cumsum.h passes CUB's removed `debug_synchronous`
# argument; deleting that argument is the whole fix (applied below, a no-op on CUDA 12).
set -euo pipefail
src_dir=${1:-}
python3 -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'install_kernels.sh: torch is a CPU build; nothing to do')"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else '9.0')")}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
pip="python3 -m pip install -q --no-deps --no-build-isolation"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [[ -n "$src_dir" ]]; then
  cp "$src_dir"/grouped_gemm-*.tar.gz "$src_dir"/megablocks-*.tar.gz "$work"/
  stk=$(ls "$src_dir"/stanford_stk-* 2>/dev/null | head -1 || true)
  [[ -n "$stk" ]] && $pip --no-index "$stk"
else
  python3 -m pip download -q --no-deps --no-binary :all: -d "$work" grouped_gemm==0.3.0 megablocks==0.10.0
  $pip stanford-stk==0.7.1
fi
tar xzf "$work"/grouped_gemm-*.tar.gz -C "$work"
tar xzf "$work"/megablocks-*.tar.gz -C "$work"
perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' "$work"/megablocks-*/csrc/cumsum.h
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$work"/grouped_gemm-0.3.0 "$work"/megablocks-0.10.0
$pip "$work"/wheels/*.whl
python3 -c "import grouped_gemm, megablocks, megablocks_ops; print('kernels ok: megablocks', megablocks.__version__)"
