"""Run `python -m train` (or the deepspeed launcher) in a subprocess with a tiny configuration."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model=tiny_moe",
    "model.num_hidden_layers=2",
    "data.seq_len=32",
    "deepspeed=zero1",
    "deepspeed.bf16=false",
    "deepspeed.micro_batch_size=2",
    "logging=off",
    "logging.progress=false",
    "checkpoint.every=0",
    "schedule.warmup_steps=2",
    "optim.lr=3e-3",
]


def free_port() -> int:
    """A free TCP port below Linux's ephemeral range (32768+), for a launcher's --master_port.

    A port the OS hands out for `bind(0)` is ephemeral: between our check and the rendezvous store
    binding it, any outgoing connection (gloo's own, a previous run's) may take it (EADDRINUSE).
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-32000")


def train(
    run_dir: Path, *overrides: str, procs: int = 1, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    args = [*TINY, f"run_dir={run_dir}", *overrides]
    if procs == 1:
        cmd = [sys.executable, "-m", "train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(procs),
            "--master_port",
            str(free_port()),
            "--module",
            "train",
            *args,
        ]
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env or {}))
    res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir)}
