"""A rank lost mid-run: the job ends by itself, and `resume=auto` continues it exactly.

Through the real deepspeed launcher, 2 processes, ep 2, CPU fp32. Rank 1 SIGKILLs itself as step 3
starts (`FINEMOE_FAULT_KILL`), between the checkpoints of steps 2 and 4. The launcher takes rank 0
down (a node's launcher sees its children die); ranks on other nodes, which no local launcher sees,
leave their collectives after `dist_timeout_s`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.train.runner import ROOT, TINY, free_port, metrics, train
from train import checkpoint

pytestmark = pytest.mark.slow

COMMON = ["max_steps=5", "parallel=ep2", "checkpoint.every=2", "dist_timeout_s=60"]


def test_sigkill_of_one_rank_ends_the_job_and_resume_is_exact(tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(straight, *COMMON, procs=2)

    launcher = ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    cmd = [sys.executable, *launcher, "--module", "train", *TINY, f"run_dir={run}", *COMMON]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", FINEMOE_FAULT_KILL="1:3")
    start = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert res.returncode != 0, res.stdout[-2000:]
    assert elapsed < 120, elapsed  # ended by itself, well inside the 300 s guard
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000002"]
    assert [m["step"] for m in metrics(run)] == [1, 2]

    train(run, *COMMON, procs=2)  # resume=auto from step 2
    want = {m["step"]: m for m in metrics(straight)}
    got = metrics(run)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    for m in got:
        for key in ("train/loss", "train/aux_loss", "train/z_loss", "train/grad_norm"):
            assert m[key] == want[m["step"]][key], (m["step"], key)
