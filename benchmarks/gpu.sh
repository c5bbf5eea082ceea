#!/usr/bin/env bash
# All GPU evidence in one command, for one H200 without network (see ../shared/gpu.md):
#
#   bash benchmarks/gpu.sh OUT_DIR            # on the GPU machine (carry .gpu: cp -r ../shared/gpu .gpu once)
#   bash benchmarks/gpu.sh OUT_DIR --tiny     # tiny shapes; without CUDA, the CPU rehearsal (below)
#
# Steps, in this order, each under its own timeout; a failure does not stop the next one:
#   setup                  .gpu/setup-device.sh: deepspeed, hydra, wandb, datasets, megablocks, grouped_gemm
#   install                pip install -e . (no deps)
#   kernels                python -m tests.gpu_guard: CUDA and megablocks' compiled ops + grouped_gemm import
#   gpu-tests              tests/moe/test_{megablocks,backends}_gpu.py against fp32 references
#   moe-layer              benchmarks/moe_layer.py --profile: one MoE layer, every implementation
#   train-step-megablocks  benchmarks/train_step.py: DeepSpeed steps of the A2.7B MoE shape, 4 layers
#   train-step-torch       the same with the torch backend, then the 7B dense shape (one process)
#   trainer-zero{1,2}-{megablocks,torch}  `python -m train` through the deepspeed launcher on one GPU (NCCL,
#                          world size 1): tiny_moe preset (widths multiples of 8), bf16, 3 steps, eval, checkpoint;
#                          the ZeRO-2 runs with activation checkpointing and the loss in chunks of 100 tokens
#   export                 python -m train.export of trainer-zero2-megablocks (trainer-zero2-torch if that
#                          did not pass, e.g. in the rehearsal)
#   export-check           benchmarks/export_check.py: transformers loads it; logits shape, finite; its eval
#                          loss equals the trainer's last eval/loss; generate()
#
# FINEMOE_REQUIRE_GPU=1 is exported (except in the rehearsal): a GPU test that would skip for want of CUDA or
# kernels fails instead, and a step passes only if it exited 0 within its timeout and its check found
# nothing skipped or missing (benchmarks/gpu_checks.py). Anything else is FAILED in summary.txt.
#
# CPU rehearsal (--tiny and no CUDA): DS_ACCELERATOR=cpu, FINEMOE_REQUIRE_GPU unset; setup, kernels, the
# megablocks steps are not run and gpu-tests only collect and skip: these are `SKIPPED (no CUDA: rehearsal)`,
# an outcome that exists only in this mode. Everything else (install, moe-layer, train-step-torch, the torch
# trainer runs through the launcher, export, export-check) really runs.
#
# Budget: the GPU command must end within 9 min (540 s; the device tool allows 600 s per command). The step
# timeouts add up to less, so that even a run in which every step hits its timeout fits (expected seconds
# on the H200 in brackets, estimated: never measured yet):
#   setup 45 [30] + install 15 [5] + kernels 15 [5] + gpu-tests 65 [35] + moe-layer 65 [40]
#   + train-step-megablocks 40 [25] + train-step-torch 55 [40] + 4 trainer runs x 45 [25] + export 15 [5]
#   + export-check 25 [10] = 520 s [~295 s]
#   + ~10 s of header and summary (GPU_BUDGET_S keeps 10 s back for it) = 530 s <= 540 s.
# A step that ignores SIGTERM gets 5 s more before SIGKILL; GPU_BUDGET_S (default 540) is the backstop: a
# step's timeout is cut to the budget left, and a step with none left is recorded FAILED (not run). The CPU
# rehearsal multiplies every timeout and the budget by GPU_TIMEOUT_SCALE (default 3 there, 1 on CUDA).
#
# OUT_DIR receives summary.txt (one row per step: outcome and seconds, then the tables; its last line
# counts passed/failed/skipped steps), gpu.log (all output), logs/STEP.log (each step's output),
# moe_layer/{moe_layer.md, moe_layer.json, profiles.txt}, trainer/RUN/{metrics.jsonl, config.yaml} and
# export_check.json. The exit status is 0 only when no step failed.
#
# Why 4 layers in train-step: one A2.7B layer holds 570.6M parameters (routed 519.0M, shared 34.6M,
# attention 16.8M), embeddings + LM head 622.3M. ZeRO-1 on one GPU keeps bf16 weights and grads, fp32
# master weights and Adam's two moments: 16 B/param, plus a transient fp32 gradient per optimizer group
# (~4 GB) and 1 GB of reduce bucket. N=4: 2.90B params = 46.5 GB + ~6 GB LM-head activations (logits
# [4096, 151936] in bf16, fp32 and their gradient) + ~1 GB per layer of activations + allocator slack =
# ~65 GB, which also fits an 80 GB H100. The dense 7B shape at 4 layers is 2.05B params (~45 GB).
set -uo pipefail
usage="usage: bash benchmarks/gpu.sh OUT_DIR [--tiny]"
out=${1:?$usage}
tiny=${2:-}
if [[ -n $tiny && $tiny != --tiny ]]; then
  echo "$usage" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out/logs" "$out/trainer"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
log=$out/gpu.log
summary=$out/summary.txt
work=$(mktemp -d "${TMPDIR:-/tmp}/finemoe-gpu.XXXXXX") # trainer runs and the export: not sent back
[[ ${GPU_KEEP_WORK:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT

cuda=$("$py" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
rehearsal=0
if [[ $tiny == --tiny && $cuda != 1 ]]; then
  rehearsal=1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# the timeouts and budget below are the GPU's; the 2-core CPU rehearsal gets 3x each (GPU_TIMEOUT_SCALE)
scale=${GPU_TIMEOUT_SCALE:-$((rehearsal ? 3 : 1))}
budget=${GPU_BUDGET_S:-$((540 * scale))}
reserve=10 # seconds kept for the summary
if ((rehearsal)); then
  export DS_ACCELERATOR=cpu
  unset FINEMOE_REQUIRE_GPU
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} FINEMOE_REQUIRE_GPU=1
fi
if [[ $tiny == --tiny ]]; then
  layer_args=(--tiny) train_args=(--size tiny --layers 2 --steps 3 --warmup 1)
else
  layer_args=() train_args=(--size gpu --layers 4 --steps 10 --warmup 2)
fi

passed=0 failed=0 skipped=0 passed_steps=()
record() { # record NAME OUTCOME SECONDS: one summary row, counted
  echo "| $1 | $2 | $3 |" >>"$summary"
  case $2 in
    ok*) passed=$((passed + 1)) ;;
    "SKIPPED (no CUDA: rehearsal)") skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
}

# step NAME TIMEOUT_S [--cuda] [--check CHECK...] -- COMMAND...
#   --cuda: not run in the rehearsal (recorded SKIPPED (no CUDA: rehearsal)).
#   --check CHECK...: run after the command unless it timed out (benchmarks/gpu_checks.py); its last output
#   line is the outcome (after a non-zero exit: the detail); exit 0 passed, 3 nothing ran for want of CUDA
#   (SKIPPED in the rehearsal only), anything else failed.
step() {
  local name=$1 limit=$(($2 * scale)) cuda_only=0 check=()
  shift 2
  while [[ $1 != -- ]]; do
    case $1 in
      --cuda) cuda_only=1 ;;
      --check)
        shift
        while [[ $1 != -- ]]; do
          check+=("$1")
          shift
        done
        continue
        ;;
      *)
        echo "step $name: unknown option $1" >&2
        exit 2
        ;;
    esac
    shift
  done
  shift
  local steplog=$out/logs/$name.log
  if ((cuda_only && rehearsal)); then
    echo "===== $name: SKIPPED (no CUDA: rehearsal): $*" | tee -a "$log" >"$steplog"
    record "$name" "SKIPPED (no CUDA: rehearsal)" 0
    return
  fi
  local left=$((budget - reserve - SECONDS))
  if ((left < 5)); then
    record "$name" "FAILED (not run: ${budget} s budget spent)" 0
    return
  fi
  ((limit > left)) && limit=$left
  echo "===== $name (timeout ${limit} s): $*" | tee -a "$log" >"$steplog"
  local t0=$SECONDS outcome=ok
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log" "$steplog"
  local rc=${PIPESTATUS[0]}
  if ((rc == 124 || rc == 137)); then
    outcome="FAILED (timeout after ${limit} s)"
  elif ((${#check[@]})); then # after a failure too: it says what is missing
    local verdict crc
    verdict=$("${check[@]}" 2>&1)
    crc=$?
    echo "$verdict" | tee -a "$log" "$steplog"
    outcome=$(tail -n 1 <<<"$verdict")
    if ((rc != 0)) && [[ $outcome == "FAILED ("*")" ]]; then
      outcome=${outcome#FAILED (}
      outcome="FAILED (exit $rc; ${outcome%)})"
    elif ((rc != 0)); then
      outcome="FAILED (exit $rc)"
    elif ((crc == 3)) && ((rehearsal)); then
      outcome="SKIPPED (no CUDA: rehearsal)"
    elif ((crc != 0)); then
      [[ $outcome == FAILED* ]] || outcome="FAILED (check exit $crc: $outcome)"
    fi
  elif ((rc != 0)); then
    outcome="FAILED (exit $rc)"
  fi
  record "$name" "$outcome" $((SECONDS - t0))
  if [[ $outcome == ok* ]]; then
    passed_steps+=("$name")
  fi
}

revision() {
  local rev
  rev=$(git rev-parse --short HEAD 2>/dev/null) || {
    echo "? (no git here)"
    return
  }
  git diff --quiet HEAD 2>/dev/null && echo "$rev" || echo "$rev + uncommitted changes"
}
{
  echo "finemoe GPU run $(date -Is), commit $(revision)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 4
  else
    echo "nvidia-smi: not on this machine"
  fi
  "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  if ((rehearsal)); then
    echo "mode: CPU rehearsal (--tiny, no CUDA): CUDA-only steps SKIPPED, FINEMOE_REQUIRE_GPU unset"
  else
    echo "mode: ${tiny:-full} on $([[ $cuda == 1 ]] && echo CUDA || echo 'NO CUDA'), FINEMOE_REQUIRE_GPU=1"
  fi
  echo
  echo "| step | outcome | seconds |"
  echo "|---|---|---:|"
} >"$summary"
: >"$log"
checks=("$py" benchmarks/gpu_checks.py)

# ---- install ------------------------------------------------------------------------------------
if [[ -d .gpu ]] || ((rehearsal)); then
  step setup 45 --cuda -- bash .gpu/setup-device.sh .gpu
else
  record setup "FAILED (no .gpu/ here: cp -r ../shared/gpu .gpu, then carry .gpu)" 0
fi
step install 15 -- "$py" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e .
step kernels 15 --cuda -- "$py" -m tests.gpu_guard

# ---- GPU tests and benchmarks -------------------------------------------------------------------
step gpu-tests 65 --check "${checks[@]}" pytest "$out/logs/gpu-tests.log" -- \
  "$py" -m pytest -q -rsxX -p no:cacheprovider tests/moe/test_megablocks_gpu.py tests/moe/test_backends_gpu.py
step moe-layer 65 --check "${checks[@]}" moe-layer "$out/moe_layer/moe_layer.json" -- \
  "$py" benchmarks/moe_layer.py --out "$out/moe_layer" --profile "${layer_args[@]}"
step train-step-megablocks 40 --cuda -- \
  "$py" benchmarks/train_step.py "${train_args[@]}" --only moe --backend megablocks
step train-step-torch 55 -- "$py" benchmarks/train_step.py "${train_args[@]}" --backend torch

# ---- the trainer through the deepspeed launcher, export, transformers -----------------------------
trainer_steps=3
trainer_args=(
  model=tiny_moe data.seq_len=128 "data.cache_dir=$work/cache" deepspeed.bf16=true deepspeed.micro_batch_size=4
  "max_steps=$trainer_steps" schedule=constant schedule.warmup_steps=0 optim.lr=1e-2
  "eval_every=$trainer_steps" eval_batches=2 checkpoint.every=0 logging=off logging.progress=false
)
port=$((20000 + RANDOM % 10000)) # below the ephemeral range
for backend in megablocks torch; do
  for zero in 1 2; do
    name=trainer-zero$zero-$backend
    run=$work/$name
    flag=()
    [[ $backend == megablocks ]] && flag=(--cuda)
    extra=() # the ZeRO-2 runs also recompute the layers and form the loss in chunks
    [[ $zero == 2 ]] && extra=(activation_checkpointing=true loss_chunk_tokens=100)
    step "$name" 45 "${flag[@]}" --check "${checks[@]}" trainer "$run" "$trainer_steps" -- \
      "$py" -m deepspeed.launcher.runner --num_gpus 1 --master_port $((port++)) --module train \
      "${trainer_args[@]}" "deepspeed=zero$zero" "model.expert_backend=$backend" "run_dir=$run" "${extra[@]}"
    if [[ -d $run ]]; then
      mkdir -p "$out/trainer/$name"
      cp "$run"/metrics.jsonl "$run"/config.yaml "$out/trainer/$name/" 2>/dev/null
    fi
  done
done
exported=trainer-zero2-torch # the megablocks run when it passed (not in the rehearsal)
[[ " ${passed_steps[*]} " == *" trainer-zero2-megablocks "* ]] && exported=trainer-zero2-megablocks
step export 15 -- "$py" -m train.export "checkpoint=$work/$exported" "output=$work/hf" dtype=float32
step export-check 25 -- "$py" benchmarks/export_check.py --run "$work/$exported" --export "$work/hf" \
  --out "$out/export_check.json"

# ---- summary ------------------------------------------------------------------------------------
{
  echo
  if grep -q '^@pytest.mark' "$out/logs/kernels.log" 2>/dev/null; then
    echo "kernels (python -m tests.gpu_guard):"
    grep '^@pytest.mark' "$out/logs/kernels.log"
    echo
  fi
  [[ -f $out/moe_layer/moe_layer.md ]] && cat "$out/moe_layer/moe_layer.md" && echo
  echo "train_step rows:"
  grep -E '^\| (MoE|dense)|^device:|^MoE / dense' "$log" || echo "(none)"
  echo
  echo "export of $exported:"
  grep -E '^export check:' "$log" || echo "export check: (not run)"
  echo
  echo "total: ${SECONDS} s (budget ${budget} s)"
  echo "RESULT: $passed passed, $failed failed, $skipped skipped (no CUDA: rehearsal) of $((passed + failed + skipped)) steps"
} >>"$summary"
echo
cat "$summary"
((failed == 0))
