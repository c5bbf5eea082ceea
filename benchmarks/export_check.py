"""A trainer run's Hugging Face export, loaded by `transformers`: shape, finiteness, eval loss, generation.

    python benchmarks/export_check.py --run RUN_DIR --export HF_DIR [--out check.json]

1. `AutoModelForCausalLM.from_pretrained(HF_DIR)` in fp32 on the run's device (CUDA when present) must
   give a `Qwen2MoeForCausalLM` (or `Qwen2ForCausalLM` for a dense run).
2. Its logits on the run's held-out batches (the trainer's `evaluate()`: the same `eval_batches`
   micro-batches of the eval split, read with the run's `config.yaml` and the tokenizer shipped in the
   export) have shape [micro_batch, seq_len, vocab] and are finite.
3. Its token-weighted cross-entropy on those batches equals the trainer's last `eval/loss` within
   `--rtol`: 1e-4 for an fp32 run; 2e-3 for a bf16 run, where the trainer scored bf16 weights in bf16 and
   this scores the fp32 master weights in fp32 (measured on CPU, tiny_moe after 3 steps: 2.6e-5). The
   loss at uniform prediction, ln(vocab), is printed beside it: gpu.sh's 3-step runs move ~9e-2 away from
   it, so this catches an export of other or untrained weights, a wrong tokenizer or wrong data; it does
   not catch a subtle layout error (after 3 steps two swapped experts move the loss by 2e-5): that is
   tests/moe/test_hf_parity.py's and tests/train/test_export.py's job.
4. Greedy `generate()` from a prompt adds 1..8 tokens.

Exit status 1 when a check fails; the report (`--out`) holds every number.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before benchmarks/ itself, whose data.py would shadow the data package

PROMPT = "The for statement in Python"
MAX_NEW_TOKENS = 8


def load_run(run: Path):
    """(data config, eval batches, micro-batch size, bf16, last eval/loss and its step) of a run."""
    from omegaconf import OmegaConf

    from data.config import DataConfig

    cfg = OmegaConf.load(run / "config.yaml")
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if "eval/loss" in r]
    if not evals:
        raise ValueError(f"{run}/metrics.jsonl has no eval/loss (train with eval_every > 0)")
    last = evals[-1]
    bf16 = cfg.deepspeed.get("bf16")
    if bf16 is None:  # "bf16 on CUDA, fp32 on CPU"; the check runs where the run ran
        bf16 = torch.cuda.is_available()
    return data, int(cfg.eval_batches), int(cfg.deepspeed.micro_batch_size), bool(bf16), last


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", type=Path, required=True, help="the trainer's run_dir (config.yaml, metrics.jsonl)"
    )
    p.add_argument("--export", type=Path, required=True, help="python -m train.export output of that run")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument(
        "--rtol", type=float, default=None, help="eval-loss tolerance (default: 2e-3 bf16, 1e-4 fp32)"
    )
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.config import Split
    from data.loader import build_loader

    t0 = time.perf_counter()
    data, eval_batches, micro_batch, bf16, last = load_run(args.run)
    rtol = args.rtol if args.rtol is not None else (2e-3 if bf16 else 1e-4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference
    tok = AutoTokenizer.from_pretrained(args.export)
    model = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32).to(device).eval()
    vocab = model.config.vocab_size
    expected_class = "Qwen2MoeForCausalLM" if getattr(model.config, "num_experts", 0) else "Qwen2ForCausalLM"
    failures: list[str] = []
    if type(model).__name__ != expected_class:
        failures.append(f"loaded as {type(model).__name__}, expected {expected_class}")

    loader = build_loader(data, tok, split=Split.eval, micro_batch_size=micro_batch)
    ce_sum, n_tokens, shape = 0.0, 0, None
    with torch.no_grad():
        for _ in range(eval_batches):
            batch = next(loader)
            ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
            logits = model(input_ids=ids).logits
            shape = list(logits.shape)
            if shape != [micro_batch, data.seq_len, vocab]:
                failures.append(f"logits shape {shape}, expected {[micro_batch, data.seq_len, vocab]}")
            if not torch.isfinite(logits).all():
                failures.append("non-finite logits")
            ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
            ce_sum += ce.item() * targets.numel()
            n_tokens += targets.numel()
    loader.close()
    loss = ce_sum / n_tokens
    want = float(last["eval/loss"])
    rel = abs(loss - want) / abs(want)
    if not rel <= rtol:
        failures.append(
            f"eval loss {loss:.6f} vs trainer's {want:.6f}: relative difference {rel:.2e} > {rtol:g}"
        )

    prompt = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id
        )
    new_tokens = out.shape[1] - prompt.shape[1]
    if not 1 <= new_tokens <= MAX_NEW_TOKENS:
        failures.append(f"generate() added {new_tokens} tokens, expected 1..{MAX_NEW_TOKENS}")
    text = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)

    report = {
        "run": str(args.run),
        "export": str(args.export),
        "device": str(device),
        "class": type(model).__name__,
        "logits_shape": shape,
        "eval_batches": eval_batches,
        "eval_tokens": n_tokens,
        "eval_loss_export_fp32": loss,
        "eval_loss_trainer": want,
        "trainer_eval_step": last.get("step"),
        "trainer_bf16": bf16,
        "rel_diff": rel,
        "rtol": rtol,
        "uniform_loss": math.log(vocab),
        "generated": text,
        "seconds": time.perf_counter() - t0,
        "failures": failures,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(
        f"export check: {type(model).__name__} on {device}, logits {shape}, eval loss {loss:.4f} (export, fp32) vs "
        f"{want:.4f} (trainer, step {last.get('step')}; uniform {math.log(vocab):.4f}), rel {rel:.1e} <= {rtol:g}: "
        + ("ok" if not failures else "FAILED: " + "; ".join(failures))
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
