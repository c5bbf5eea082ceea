"""A rank lost mid-run: the job ends by itself, and `resume=auto` continues it exactly.

Through the real deepspeed launcher, 2 processes, ep 2, CPU fp32. Rank 1 SIGKILLs itself as step 3
starts (`FINEMOE_FAULT_KILL`), between the checkpoints of steps 2 and 4. The launcher takes rank 0
down (a node's launcher sees its children die); ranks on other nodes, which no local launcher sees,
leave their collectives after `dist_timeout_s`.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.train.runner import CPU_ENV, TINY, metrics, module_cmd, run_tree, train
from train import checkpoint

pytestmark = pytest.mark.slow

# sequence-scope balancing is independent of how the global batch is split into micro-batches, so a
# resume on another number of processes optimises the same objective
COMMON = [
    "max_steps=5",
    "checkpoint.every=2",
    "checkpoint.keep_last=5",
    "dist_timeout_s=60",
    "moe.balance_scope=sequence",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: 2 processes, ep 2, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(run, *COMMON, "parallel=ep2", procs=2)
    return run


def test_sigkill_of_one_rank_ends_the_job_and_resume_is_exact(tmp_path, straight):
    run = tmp_path / "run"

    cmd = module_cmd("train", *TINY, f"run_dir={run}", *COMMON, "parallel=ep2", procs=2)
    env = dict(os.environ, **CPU_ENV, FINEMOE_FAULT_KILL="1:3")
    res = run_tree(cmd, env, timeout=300)
    # timed from the last change to checkpoints/ (step 2's rename, just before rank 1 dies), not from
    # the launch: start-up time depends on the machine's load, the teardown is what is tested
    since_kill = time.time() - (run / "checkpoints").stat().st_mtime
    assert res.returncode != 0, res.stdout[-2000:]
    assert since_kill < 60, since_kill  # ended by the launcher, not by the 60 s collective timeout
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000002"]
    assert [m["step"] for m in metrics(run)] == [1, 2]

    train(run, *COMMON, "parallel=ep2", procs=2)  # resume=auto from step 2
    want = {m["step"]: m for m in metrics(straight)}
    got = metrics(run)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    for m in got:
        for key in ("train/loss", "train/aux_loss", "train/z_loss", "train/grad_norm"):
            assert m[key] == want[m["step"]][key], (m["step"], key)


def test_resume_on_one_process_continues_the_two_process_run(tmp_path, straight):
    """2 processes (ep 2) -> 1 process (ep 1, grad_accum 2: the same global batch of 4 sequences).

    Restored: weights, Adam moments and step, the LR schedule's position, the data position (a global
    sample index, so the next step sees the same sequences), the routers' selection biases. Not
    restored: the per-rank RNG states, kept per rank and used only when the world size is unchanged
    (nothing in training draws random numbers: no dropout). Tolerance: rel 1e-5, the fp32 summation
    order of 2 ranks' reduction against 2 accumulated micro-batches (measured ~1e-7)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    train(run, *COMMON, "parallel=none", "deepspeed.grad_accum=2")
    want = {m["step"]: m for m in metrics(straight)}
    got = metrics(run)
    assert [m["step"] for m in got] == [3, 4, 5]
    for m in got:
        assert m["train/tokens_seen"] == want[m["step"]]["train/tokens_seen"]
        for key in ("train/loss", "train/aux_loss", "train/grad_norm", "train/lr"):
            assert m[key] == pytest.approx(want[m["step"]][key], rel=1e-5), (m["step"], key)
