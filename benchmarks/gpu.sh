#!/usr/bin/env bash
# All GPU evidence in one command, for one H100 without network (see ../shared/gpu.md):
#
#   bash benchmarks/gpu.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/gpu.sh OUT_DIR --tiny     # rehearsal: tiny shapes (CPU: CUDA-only parts skip)
#
# 1. installs the carried packages and kernels (`bash .gpu/setup-device.sh .gpu`) and finemoe itself;
# 2. the GPU tests (backends against fp32 loop references, whole-model logits across backends);
# 3. benchmarks/moe_layer.py: one MoE layer, forward + backward, against transformers and megablocks;
# 4. benchmarks/train_step.py: whole DeepSpeed steps (ZeRO-1, bf16, seq 4096, micro-batch 1) of the
#    A2.7B-shaped MoE (megablocks, then torch backend) and of the 7B-shaped dense model, 4 layers each.
#
# Why 4 layers: one A2.7B layer holds 570.6M parameters (routed 519.0M, shared 34.6M, attention 16.8M),
# embeddings + LM head 622.3M. ZeRO-1 on one GPU keeps bf16 weights and grads, fp32 master weights and
# Adam's two moments: 16 B/param, plus a transient fp32 gradient per optimizer group (~4 GB) and 1 GB of
# reduce bucket. N=4: 2.90B params = 46.5 GB + ~6 GB LM-head activations (logits [4096, 151936] in bf16,
# fp32 and their gradient) + ~1 GB per layer of activations + allocator slack = ~65 GB of 80. N=5 needs
# ~75 GB, too close to the limit. The dense 7B shape at 4 layers is 2.05B params (~45 GB).
#
# Needs `.gpu/` in the repository root: `cp -r ../shared/gpu .gpu` once (git ignores it) and carry it.
# Steps run in this order, each under its own timeout, and a failure does not stop the next one; the whole
# run ends within GPU_BUDGET_S seconds (default 540). OUT_DIR receives five files: summary.txt, gpu.log
# (every step's output) and moe_layer/{moe_layer.md, moe_layer.json, profiles.txt}.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [--tiny]}
tiny=${2:-}
if [[ $tiny == --tiny ]]; then
  layer_args=(--tiny) train_args=(--size tiny --layers 2 --steps 3 --warmup 1)
elif [[ -z $tiny ]]; then
  layer_args=() train_args=(--size gpu --layers 4 --steps 10 --warmup 2)
else
  echo "usage: bash benchmarks/gpu.sh OUT_DIR [--tiny]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
budget=${GPU_BUDGET_S:-540}
log=$out/gpu.log
summary=$out/summary.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

step() { # step NAME TIMEOUT_S COMMAND...: run under min(TIMEOUT_S, budget left), log, record the outcome
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  if ((left < 30)); then
    echo "| $name | skipped: ${budget} s budget spent | 0 |" >>"$summary"
    return
  fi
  ((limit > left)) && limit=$left
  echo "===== $name (timeout ${limit} s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]} status=ok
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT after ${limit} s"
  elif ((rc != 0)); then
    status="FAILED (exit $rc)"
  fi
  echo "| $name | $status | $((SECONDS - t0)) |" >>"$summary"
}

{
  echo "finemoe GPU run $(date -Is), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $py -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  echo
  echo "| step | outcome | seconds |"
  echo "|---|---|---:|"
} >"$summary"
: >"$log"

if [[ -d .gpu ]]; then
  step setup 240 bash .gpu/setup-device.sh .gpu
else
  echo "| setup | FAILED: no .gpu/ here (cp -r ../shared/gpu .gpu, then carry .gpu) | 0 |" >>"$summary"
fi
step install 90 $py -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e .
step gpu-tests 150 $py -m pytest -q -rs -p no:cacheprovider \
  tests/moe/test_megablocks_gpu.py tests/moe/test_backends_gpu.py
step moe-layer 200 $py benchmarks/moe_layer.py --out "$out/moe_layer" --profile "${layer_args[@]}"
step train-moe-megablocks 120 $py benchmarks/train_step.py "${train_args[@]}" --only moe --backend megablocks
step train-moe-torch 100 $py benchmarks/train_step.py "${train_args[@]}" --only moe --backend torch
step train-dense 100 $py benchmarks/train_step.py "${train_args[@]}" --only dense

{
  echo
  echo "total: ${SECONDS} s"
  echo
  [[ -f $out/moe_layer/moe_layer.md ]] && cat "$out/moe_layer/moe_layer.md"
  echo
  echo "train_step rows:"
  grep -E '^\| (MoE|dense)|^device:' "$log" || echo "(none)"
} >>"$summary"
echo
cat "$summary"
