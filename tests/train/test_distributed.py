"""2-process gloo runs through the real deepspeed launcher: expert parallel == data parallel == 1 process.

The single-process run uses 2 gradient-accumulation steps over the same global batch, so all three
layouts optimise the same objective; losses, DeepSpeed's gradient norms and every gradient must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.ep_worker import SKEW_STEP
from tests.train.runner import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_worker(tmp: Path, name: str, procs: int, ep: int, zero: int, ga: int, mb: int, scope: str) -> dict:
    out = tmp / f"{name}.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    args = ["-m", "tests.train.ep_worker", str(out), str(ep), str(zero), str(ga), str(mb), scope]
    port = free_port()
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(procs),
            "--master_port",
            str(port),
            "--no_local_rank",
            "--module",
            *args[1:],
        ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    # DeepSpeed's CPU shared-memory workspace must not outlive the run (train.engine unlinks it)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("ref"), "single", 1, 1, 1, 2, 2, "micro_batch")


def _assert_same(got: dict, want: dict) -> None:
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want["loss"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        torch.tensor(got["grad_norm"]), torch.tensor(want["grad_norm"]), rtol=1e-5, atol=0
    )
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")


@pytest.mark.parametrize(("ep", "zero"), [(2, 1), (2, 2), (1, 1), (2, 0)])
def test_two_processes_equal_single_process(reference, tmp_path, ep, zero):
    got = run_worker(tmp_path, f"ep{ep}_z{zero}", 2, ep, zero, 1, 2, "micro_batch")
    _assert_same(got, reference)


def test_skewed_step_really_is_skewed(reference):
    """The skew step routes expert 3 from one half of the batch only, and expert 0 from nowhere."""
    tokens = reference["expert_tokens"][SKEW_STEP * 2 : SKEW_STEP * 2 + 2]  # the two micro-batches (= ranks)
    assert all((t[:, 0] == 0).all() for t in tokens)
    assert (tokens[0][:, 3] > 0).all() and (tokens[1][:, 3] == 0).all()
    grads = reference["grads"][SKEW_STEP]
    for name, g in grads.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert g[0].abs().max() == 0, name  # no token anywhere: exactly zero gradient
            assert g[3].abs().max() > 0, name


def test_global_batch_scope_equals_single_process(tmp_path):
    ref = run_worker(tmp_path, "single_global", 1, 1, 1, 1, 4, "global_batch")
    got = run_worker(tmp_path, "two_global", 2, 2, 1, 1, 2, "global_batch")
    _assert_same(got, ref)
