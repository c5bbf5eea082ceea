"""Hydra sweeps of the trainer (`train/sweep.py`): one run directory per job, named after its overrides."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.train.runner import ROOT, TINY, metrics
from train.sweep import SweepPlan


@pytest.mark.slow
def test_two_job_sweep_trains_two_runs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "train", "-m", *TINY, "max_steps=3", "optim.lr=1e-3,1e-2"]
    res = subprocess.run(
        [*cmd, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed" not in res.stdout
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0_optim.lr=0.001", "1_optim.lr=0.01"]
    a, b = metrics(runs[0]), metrics(runs[1])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    # the same initial weights and batch: job 1 started fresh rather than from job 0's checkpoint
    assert a[0]["train/loss"] == b[0]["train/loss"]
    assert a[-1]["train/loss"] != b[-1]["train/loss"]
    assert b[-1]["train/lr"] == pytest.approx(10 * a[-1]["train/lr"])
    for run, name in zip(runs, ["optim.lr=0.001", "optim.lr=0.01"]):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert (cfg["run_dir"], cfg["logging"]["name"]) == (str(run), name)  # the wandb run's name


def test_plan_reads_the_command_line():
    plan = SweepPlan.from_argv(["-m", "model=tiny_moe", "optim.lr=1e-3,3e-3", "+x=range(2)"])
    assert plan == SweepPlan(multirun=True, swept=("optim.lr", "x"), given=("model", "optim.lr", "x"))
    assert plan.hydra_overrides() == ["hydra.job.config.override_dirname.exclude_keys=['model']"]
    single = SweepPlan.from_argv(["-m", "optim.lr=1e-3"])
    assert single.hydra_overrides()[-1] == "hydra.sweep.subdir=${hydra.job.num}"
    assert SweepPlan.from_argv(["optim.lr=1e-3,3e-3"]).hydra_overrides() == []  # no -m: Hydra refuses it
    assert not SweepPlan.from_argv(["-m", "optim.lr=[1"]).swept  # Hydra reports the parse error


@pytest.mark.parametrize(
    ("argv", "world", "error"),
    [
        (["-m", "run_dir=r", "optim.lr=1e-3,3e-3"], 1, "run_dir is shared by every job"),
        (["-m", "run_dir=r", "checkpoint.resume=auto", "max_steps=10,20"], 1, None),  # stages of one run
        (["-m", "run_dir=a,b", "optim.lr=1e-3,3e-3"], 1, None),
        (["-m", "run_dir=r", "optim.lr=1e-3"], 1, None),  # one job
        (["run_dir=r", "optim.lr=1e-3"], 1, None),
        (["-m", "optim.lr=1e-3,3e-3"], 2, "needs hydra.sweep.dir=<dir>"),
        (["-m", "optim.lr=1e-3,3e-3", "hydra.sweep.dir=s"], 2, None),
    ],
)
def test_plan_refuses_shared_directories(argv, world, error):
    plan = SweepPlan.from_argv(argv)
    if error is None:
        plan.check(world)
    else:
        with pytest.raises(ValueError, match=error):
            plan.check(world)
