"""Run `python -m train` (or the deepspeed launcher) in a subprocess with a tiny configuration."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from train.engine import free_port

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


CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
"""What every test launch sets: DeepSpeed's CPU accelerator, one thread per process."""


def module_cmd(
    module: str, *args: str, procs: int = 1, port: int | None = None, local_rank_arg: bool = True
) -> list[str]:
    """`python -m module args`, alone for one process, else under the deepspeed launcher on `port` (a
    free one by default). Workers that do not parse `--local_rank` need `local_rank_arg=False`."""
    if procs == 1:
        return [sys.executable, "-m", module, *args]
    launcher = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(procs)]
    launcher += ["--master_port", str(port or free_port())]
    launcher += [] if local_rank_arg else ["--no_local_rank"]
    return [sys.executable, *launcher, "--module", module, *args]


def run_tree(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)`, except that a timeout (or an
    interrupted test) kills the whole process tree, the launcher's trainers too, not the runner alone:
    a hung launch must not load the machine for the tests after it."""
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException as e:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            if isinstance(e, subprocess.TimeoutExpired):
                e.stdout, e.stderr = out, err
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train(
    run_dir: Path, *overrides: str, procs: int = 1, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = module_cmd("train", *TINY, f"run_dir={run_dir}", *overrides, procs=procs)
    full_env = dict(os.environ, **CPU_ENV, **(env or {}))
    res = run_tree(cmd, full_env, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_steps(run_dir: Path) -> int:
    """Complete lines of a running trainer's metrics.jsonl (a line being appended may be half there)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir)}
