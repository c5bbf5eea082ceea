"""Whole training steps through the DeepSpeed engine: tokens/s and MFU, MoE against dense.

    python benchmarks/train_step.py                       # CPU smoke size (CI runs this)
    python benchmarks/train_step.py --size gpu --layers 8 # A2.7B-shaped MoE vs 7B-shaped dense, seq 4096

Both models are cut to the same number of layers. MFU = model FLOPs (6 x activated matmul params +
attention, `train.metrics.flops_per_token`) / step time / peak, where peak is the device's nominal
bf16 peak when known (H100: 989 TFLOP/s) and, always, a large matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before benchmarks/, whose data.py
# would shadow the data package (train.comm -> train.config -> data.config)

from cli import run_without_finalizing  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.model import Qwen2MoEForCausalLM  # noqa: E402
from train import engine as ds  # noqa: E402
from train.comm import Comm  # noqa: E402
from train.metrics import flops_per_token, peak_tflops  # noqa: E402

A27B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
)
Q7B = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    num_experts=0,
)
TINY_MOE = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=352,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=14,
    num_experts_per_tok=2,
    moe_intermediate_size=88,
    shared_expert_intermediate_size=176,
)
TINY_DENSE = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=704,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=0,
)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, fields: dict, args, device: torch.device) -> dict:
    cfg = ModelConfig(num_hidden_layers=args.layers, expert_backend=args.backend, **fields).validate()
    with torch.device("meta"):
        model = Qwen2MoEForCausalLM(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights()
    model.gradient_checkpointing = args.checkpointing
    model.loss_chunk_tokens = args.loss_chunk_tokens  # model FLOPs do not count its recomputation
    group = ds.shard_experts(model, 1)
    bf16 = device.type == "cuda"
    eng = ds.build_engine(
        model,
        ep_group_name=group,
        ep_size=1,
        num_experts=cfg.num_experts,
        lr=1e-4,
        zero_stage=args.zero,
        bf16=bf16,
        micro_batch_size=args.micro_batch,
        overlap_comm=args.overlap_comm,
    )
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=device)
        _sync(device)
        t = time.perf_counter()
        out = eng(input_ids=ids[:, :-1], targets=ids[:, 1:])
        eng.backward(out.loss)
        eng.step()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tokens = args.micro_batch * args.seq
    tflops = flops_per_token(cfg, args.seq) * tokens / dt / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del eng, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {
        "name": name,
        "ms": dt * 1e3,
        "tok_s": tokens / dt,
        "tflops": tflops,
        "mem": mem,
        "params": cfg.num_params()["total"] / 1e9,
        "active": cfg.num_params()["activated"] / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "gpu"], default="tiny")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--loss-chunk-tokens", type=int, default=0, help="the trainer's loss_chunk_tokens")
    p.add_argument("--zero", type=int, choices=[1, 2], default=1, help="ZeRO stage")
    p.add_argument("--overlap-comm", action="store_true", help="ZeRO-2's overlap_comm")
    p.add_argument("--only", choices=["moe", "dense"], default=None)
    args = p.parse_args()
    gpu = args.size == "gpu"
    args.seq = args.seq or (4096 if gpu else 64)
    args.micro_batch = args.micro_batch or (1 if gpu else 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    Comm.init(device.type)  # binds the GPU before NCCL starts
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measured = measured_matmul_tflops(device, dtype)
    nominal = peak_tflops(device)
    rows = []
    if args.only != "dense":
        rows.append(
            bench("MoE (A2.7B shape)" if gpu else "MoE (tiny)", A27B if gpu else TINY_MOE, args, device)
        )
    if args.only != "moe":
        rows.append(
            bench("dense (7B shape)" if gpu else "dense (tiny)", Q7B if gpu else TINY_DENSE, args, device)
        )
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; layers {args.layers}, "
        f"seq {args.seq}, micro-batch {args.micro_batch}; matmul measured {measured:.1f} TFLOP/s"
        + (f", nominal peak {nominal:.0f}" if nominal else "")
    )
    print(
        "| model | params B | active B | ms/step | tokens/s | TFLOP/s | MFU vs measured | MFU vs nominal | GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu_nom = f"{r['tflops'] / nominal:.1%}" if nominal else "n/a"
        print(
            f"| {r['name']} | {r['params']:.2f} | {r['active']:.2f} | {r['ms']:.1f} | {r['tok_s']:.0f} | "
            f"{r['tflops']:.2f} | {r['tflops'] / measured:.1%} | {mfu_nom} | {r['mem']:.1f} |"
        )
    if len(rows) == 2:
        print(f"MoE / dense MFU ratio: {rows[0]['tflops'] / rows[1]['tflops']:.2f}")


if __name__ == "__main__":
    run_without_finalizing(main)  # the process groups must not meet interpreter finalization
