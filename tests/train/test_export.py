"""Export to Hugging Face and resharding across ep_size (2-process runs through the launcher)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.train.probe import probe_ids
from tests.train.runner import ROOT, losses, train
from train import checkpoint
from train.export import export

pytestmark = pytest.mark.slow


def trained_logits(ckpt, tmp_path):
    out = tmp_path / "probe.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    res = subprocess.run(
        [sys.executable, "-m", "tests.train.probe", str(ckpt), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """5 steps of a tiny MoE on 2 processes, ep_size=2, ZeRO-2 (ZeRO-1 is covered by test_distributed),
    checkpoints at steps 3 and 5."""
    run = tmp_path_factory.mktemp("ep2") / "run"
    train(run, "max_steps=5", "parallel=ep2", "deepspeed.zero_stage=2", "checkpoint.every=3", procs=2)
    return run


def test_moe_export_loads_in_transformers_with_trained_logits(tmp_path, ep2_run):
    from transformers import Qwen2MoeForCausalLM

    step3 = ep2_run / "checkpoints" / "step_00000003"
    out = tmp_path / "hf"
    report = export(step3, out, dtype="float32")
    assert report["step"] == 3 and report["ep_size"] == 2 and report["tokens_seen"] == 3 * 2 * 2 * 32
    hf = Qwen2MoeForCausalLM.from_pretrained(out).eval()
    cfg = hf.config
    with torch.no_grad():
        got = hf(probe_ids(cfg.vocab_size)).logits
    want = trained_logits(step3, tmp_path)
    assert (got - want).abs().max().item() <= 1e-5
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_moe_export_after_zero1(tmp_path):
    from transformers import Qwen2MoeForCausalLM

    run = tmp_path / "run"
    train(run, "max_steps=3", "parallel=ep2", "deepspeed.zero_stage=1", procs=2)
    export(run, tmp_path / "hf", dtype="float32")
    hf = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = hf(probe_ids(hf.config.vocab_size)).logits
    want = trained_logits(checkpoint.list_complete(run)[-1], tmp_path)
    assert (got - want).abs().max().item() <= 1e-5


def test_dense_export_loads_as_qwen2(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    run = tmp_path / "run"
    train(run, "max_steps=2", "model=tiny_dense", "model.num_hidden_layers=2")
    out = tmp_path / "hf"
    export(run, out, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is Qwen2ForCausalLM
    with torch.no_grad():
        got = hf(probe_ids(hf.config.vocab_size)).logits
    want = trained_logits(checkpoint.list_complete(run)[-1], tmp_path)
    assert (got - want).abs().max().item() <= 1e-5


def test_resume_with_another_ep_size(tmp_path, ep2_run):
    """ep 2 -> 1 -> 2 on two processes: each next step's loss equals the uninterrupted ep=2 run's."""
    hop = tmp_path / "hop"
    (hop / "checkpoints").mkdir(parents=True)
    shutil.copytree(ep2_run / "checkpoints" / "step_00000003", hop / "checkpoints" / "step_00000003")
    common = ["max_steps=5", "deepspeed.zero_stage=2"]
    train(hop, *common, "parallel=none", "stop_at_step=4", procs=2)
    train(hop, *common, "parallel=ep2", procs=2)
    a, b = losses(ep2_run), losses(hop)
    for step in (4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=0), (step, a, b)


def test_incomplete_checkpoint_is_refused_and_nothing_written(tmp_path, ep2_run):
    run = tmp_path / "run"
    shutil.copytree(ep2_run / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "checkpoints" / "step_00000003")
    ckpt = checkpoint.list_complete(run)[-1]
    out = tmp_path / "hf"
    # a truncated shard is named (sizes are checked against meta.json before anything is read)
    shard = ckpt / "shards" / "dense-r00000-000.safetensors"
    saved = shard.read_bytes()
    shard.write_bytes(saved[:100])
    with pytest.raises(ValueError, match=r"dense-r00000-000\.safetensors is 100 bytes, meta\.json records"):
        export(ckpt, out)
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp*"))
    # an unreadable one of the right size is named, and the half-written export is removed
    shard.write_bytes(b"\xff" * len(saved))
    with pytest.raises(ValueError, match="dense-r00000-000.safetensors: cannot be read as safetensors"):
        export(ckpt, out)
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp*"))
    shard.write_bytes(saved)
    (ckpt / "shards" / "experts-r00001-000.safetensors").unlink()
    with pytest.raises(ValueError, match=r"experts-r00001-000\.safetensors is missing"):
        export(run, out)
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp*"))
    (ckpt / "meta.json").unlink()
    with pytest.raises(ValueError, match="run directory .* holds no complete checkpoint"):
        export(run, out)
