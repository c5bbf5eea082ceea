"""The benchmarks run on CPU and print their tables (their GPU numbers belong to BENCHMARKS.md)."""

import os
import subprocess
import sys

from tests.train.runner import ROOT


def test_train_step_benchmark_smoke():
    res = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--steps", "1", "--warmup", "0"],
        cwd=ROOT,
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [
        line for line in res.stdout.splitlines() if line.startswith("| MoE") or line.startswith("| dense")
    ]
    assert len(rows) == 2
    assert "MoE / dense MFU ratio:" in res.stdout


def test_loss_chunks_benchmark_smoke():
    """Tiny run of benchmarks/loss_chunks.py: the table, equal losses, and a smaller peak with chunks."""
    cmd = [sys.executable, "benchmarks/loss_chunks.py", "--hidden", "32", "--seq", "128", "--batch", "1"]
    res = subprocess.run(
        [*cmd, "--chunks", "0", "16", "--iters", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [
        line.split("|")[1:-1]
        for line in res.stdout.splitlines()
        if line.startswith("| ") and "loss" not in line
    ]
    assert [int(r[0]) for r in rows] == [0, 16]
    assert abs(float(rows[1][1]) - float(rows[0][1])) <= 2e-6 * float(
        rows[0][1]
    )  # the same loss (fp32 order)
    assert float(rows[1][3]) < 0.5  # peak vs no chunks: 16 of 128 tokens' vocabulary tensors
