"""The loss in chunks (`loss_chunk_tokens`): peak memory and time of one forward + backward.

    python benchmarks/loss_chunks.py                      # CPU: peak RSS above the start, fp32
    python benchmarks/loss_chunks.py --dtype bfloat16     # CPU, bf16 (slow matmuls; for the memory)
    python benchmarks/loss_chunks.py --device cuda        # GPU: torch.cuda.max_memory_allocated, bf16

The model is one dense decoder layer of hidden size `--hidden` with Qwen1.5's vocabulary (151936), so
that the LM head and the loss dominate, as they do in a checkpointed A2.7B micro-batch. Each chunk size
runs in a fresh process (CPU peak RSS is per process); the first row (0: no chunks) is the baseline of
the ratios. Time: median of `--iters` forward + backward passes after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))  # before benchmarks/ itself, whose data.py would shadow the data package
    import torch

    from moe.config import ModelConfig
    from moe.model import Qwen2MoEForCausalLM

    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else torch.bfloat16
        if device.type == "cuda"
        else torch.float32
    )
    cfg = ModelConfig(
        vocab_size=151936,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2MoEForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(device, dtype).train()
    model.loss_chunk_tokens = args.chunk
    ids = torch.randint(
        0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)

    def step() -> float:
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the peak is the step's own
        out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        return out.loss.item()

    loss = step()  # warm-up: gradients allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _rss_bytes()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    return {"chunk": args.chunk, "loss": loss, "peak_bytes": peak, "seconds": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="float32 | bfloat16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # one measurement, in this process
    args = p.parse_args()
    if args.chunk is not None:
        print(json.dumps(measure(args)))
        return
    rows = []
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--chunk", str(chunk), "--device", args.device]
        cmd += ["--dtype", args.dtype] if args.dtype else []
        cmd += ["--hidden", str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--iters", str(args.iters)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"chunk {chunk} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]
    tokens = args.batch * args.seq
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    print(f"device {args.device}, {dtype}, {tokens} tokens, vocabulary 151936, hidden {args.hidden}, 1 layer")
    print("| loss_chunk_tokens | loss | peak (GB) | peak vs no chunks | s per step | time vs no chunks |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['chunk']} | {r['loss']:.6f} | {r['peak_bytes'] / 1e9:.2f} | "
            f"{r['peak_bytes'] / base['peak_bytes']:.2f} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
