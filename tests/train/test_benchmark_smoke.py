"""benchmarks/train_step.py runs on CPU and prints its table (its GPU numbers belong to BENCHMARKS.md)."""

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
