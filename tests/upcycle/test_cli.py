"""`python -m upcycle` (the `finemoe-upcycle` console script): Hydra overrides, dry run, errors."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.upcycle.fixtures import dense_logits, input_ids, logits_hf, make_dense, report

REPO = Path(__file__).resolve().parents[2]


def _run(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "upcycle", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_dry_run_then_run(tmp_path):
    dense = make_dense(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text("{}")
    overrides = [
        "source=dense",  # relative to the working directory: Hydra does not change it
        "output=moe",
        "upcycle.strategy=copy",
        "moe.num_experts=4",
        "moe.num_experts_per_tok=2",
        "upcycle.progress=false",
    ]
    dry = _run(*overrides, "upcycle.dry_run=true", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "4 routed x 96, top-2, norm_topk_prob=true, no shared expert" in dry.stdout
    assert "forced          shared_expert_intermediate_size: 5632 -> 0 (strategy copy)" in dry.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]

    done = _run(*overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("init distance on 256 tokens (random ids): FFN relative error "), last
    out = tmp_path / "moe"
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "upcycle_report.json",
        "model.safetensors.index.json",
    } <= {p.name for p in out.iterdir()}
    rep = report(out)
    assert rep["strategy"] == "copy" and rep["source_fingerprint"].startswith("sha256:")
    assert rep["bytes_written"] == rep["plan"]["bytes_to_write"]
    ids = input_ids()
    torch.testing.assert_close(logits_hf(out, ids), dense_logits(dense, ids), rtol=0, atol=1e-5)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    make_dense(tmp_path / "dense")
    res = _run("source=dense", "output=moe", "upcycle.strategy=split", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "finemoe-upcycle: error: strategy split partitions the dense FFN among routed experts only: set "
        "moe.shared_expert_intermediate_size=0 (got 5632)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
