"""The whole recipe on a laptop: dense pretrain -> export -> upcycle -> MoE train -> export -> generate.

    python -m launch.quickstart                     # CPU or one GPU, runs/quickstart/
    python -m launch.quickstart --procs 2 --cpu     # the training stages under the deepspeed launcher
    python -m launch.quickstart --dense-steps 20 --moe-steps 10 --run-dir /tmp/qs   # a smoke run

Each stage is the project's own command line, run as a subprocess and printed before it runs, so
the log doubles as a tutorial. The MoE shape is `configs/upcycle/moe/tiny_moe.yaml`: 2 shared + 14
routed fine-grained experts of 88 (top-2) cut from the dense FFN of 352 by the `finegrained` recipe.
On a GPU with megablocks installed the same command uses its kernels (`expert_backend=auto`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from cli import guarded

PROG = "python -m launch.quickstart"
PROMPT = "The for statement in Python"


def run(cmd: list[str], env: dict[str, str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, env=env)
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def train_cmd(procs: int, port: int, overrides: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "train", *overrides]
    return [
        sys.executable,
        "-m",
        "launch.run",
        "--num-gpus",
        str(procs),
        "--master-port",
        str(port),
        "--",
        *overrides,
    ]


def generate(model_dir: Path, prompt: str, new_tokens: int) -> tuple[str, int]:
    """Greedy continuation of exactly `new_tokens` tokens; returns the text and the count generated."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=1.3,
            pad_token_id=tok.eos_token_id,
        )
    return str(tok.decode(out[0], skip_special_tokens=True)), out.shape[1] - ids.shape[1]


@guarded(PROG, also=(subprocess.CalledProcessError,))  # a failed stage: its own error is printed above
def main() -> None:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--procs", type=int, default=1, help="training processes (deepspeed launcher when > 1)")
    p.add_argument("--cpu", action="store_true", help="force CPU (DS_ACCELERATOR=cpu)")
    p.add_argument("--dense-steps", type=int, default=None, help="override the preset's dense steps")
    p.add_argument("--moe-steps", type=int, default=None, help="override the preset's MoE steps")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument("--master-port", type=int, default=29533)
    args = p.parse_args()
    for name in ("procs", "dense_steps", "moe_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    root = Path(args.run_dir)
    env = dict(os.environ)
    import torch

    if args.cpu or not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    common = [f"logging.wandb={args.wandb}"]
    start = time.time()

    dense = ["experiment=quickstart_dense", f"run_dir={root / 'dense'}", *common]
    if args.dense_steps:
        dense.append(f"max_steps={args.dense_steps}")
    run(train_cmd(args.procs, args.master_port, dense), env)
    run(
        [
            sys.executable,
            "-m",
            "train.export",
            f"checkpoint={root / 'dense'}",
            f"output={root / 'dense_hf'}",
            "dtype=float32",
            "overwrite=true",
        ],
        env,
    )
    run(
        [
            sys.executable,
            "-m",
            "upcycle",
            f"source={root / 'dense_hf'}",
            f"output={root / 'moe_init'}",
            "upcycle/moe@moe=tiny_moe",
            "upcycle.strategy=finegrained",
            "upcycle.overwrite=true",
        ],
        env,
    )
    moe = ["experiment=quickstart_moe", f"init_from={root / 'moe_init'}", f"run_dir={root / 'moe'}", *common]
    if args.moe_steps:
        moe.append(f"max_steps={args.moe_steps}")
    run(train_cmd(args.procs, args.master_port + 1, moe), env)
    run(
        [
            sys.executable,
            "-m",
            "train.export",
            f"checkpoint={root / 'moe'}",
            f"output={root / 'moe_hf'}",
            "dtype=float32",
            "overwrite=true",
        ],
        env,
    )

    print(f"\n$ transformers AutoModelForCausalLM.from_pretrained({root / 'moe_hf'}).generate(...)")
    text, count = generate(root / "moe_hf", PROMPT, 40)
    print(
        f"\n--- generated by the upcycled MoE ({count} new tokens) ---\n{text}\n-------------------------------------"
    )
    print(f"quickstart finished in {time.time() - start:.0f} s; runs, checkpoints and exports in {root}/")


if __name__ == "__main__":
    main()
