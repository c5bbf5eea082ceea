"""Export to Hugging Face and resharding across ep_size (2-process runs through the launcher)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.train.live_worker import probe_ids
from tests.train.runner import CPU_ENV, TINY, losses, module_cmd, run_tree, train
from train import checkpoint
from train.export import export

pytestmark = pytest.mark.slow


def train_live(run, *overrides: str, procs: int = 1) -> torch.Tensor:
    """`Trainer(...).fit()` in `procs` processes; returns the in-memory model's final probe logits."""
    out = run.parent / f"{run.name}_live.pt"
    args = [str(out), *TINY, f"run_dir={run}", *overrides]
    cmd = module_cmd("tests.train.live_worker", *args, procs=procs, local_rank_arg=False)
    env = dict(os.environ, **CPU_ENV)
    res = run_tree(cmd, env, timeout=600)
    assert res.returncode == 0 and out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    return torch.load(out, weights_only=True)


def exported_logits(src, out) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    export(src, out, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        return hf(probe_ids(hf.config.vocab_size)).logits


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory):
    """5 steps of a tiny MoE on 2 processes, ep_size=2, ZeRO-2, checkpoints at steps 3 and 5; and the
    live model's logits after step 5."""
    run = tmp_path_factory.mktemp("ep2") / "run"
    live = train_live(
        run, "max_steps=5", "parallel=ep2", "deepspeed.zero_stage=2", "checkpoint.every=3", procs=2
    )
    return run, live


def test_moe_export_equals_the_live_model_zero2(tmp_path, ep2_run):
    """The export of the final checkpoint, loaded by transformers, reproduces the logits of the model
    that was in memory (gathered ZeRO-2 partitions, both EP ranks' experts) at the end of training."""
    run, live = ep2_run
    got = exported_logits(run, tmp_path / "hf")
    assert (got - live).abs().max().item() <= 1e-5
    report = json.loads((tmp_path / "hf" / "export_report.json").read_text())
    assert report["step"] == 5 and report["ep_size"] == 2 and report["tokens_seen"] == 5 * 2 * 2 * 32
    out = tmp_path / "hf"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_moe_export_equals_the_live_model_zero1(tmp_path):
    run = tmp_path / "run"
    live = train_live(run, "max_steps=3", "parallel=ep2", "deepspeed.zero_stage=1", procs=2)
    assert (exported_logits(run, tmp_path / "hf") - live).abs().max().item() <= 1e-5


def test_dense_export_equals_the_live_model(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    run = tmp_path / "run"
    live = train_live(run, "max_steps=2", "model=tiny_dense", "model.num_hidden_layers=2")
    assert (exported_logits(run, tmp_path / "hf") - live).abs().max().item() <= 1e-5
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")) is Qwen2ForCausalLM


def test_resume_with_another_ep_size(tmp_path, ep2_run):
    """ep 2 -> 1 -> 2 on two processes: each next step's loss equals the uninterrupted ep=2 run's."""
    ep2_run, _ = ep2_run
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
    ep2_run, _ = ep2_run
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
    # one flipped byte in a tensor (same size, still valid safetensors): the sha256 check names the file
    # before anything is written; without it the export would carry the damage silently
    flipped = bytearray(saved)
    flipped[-4] ^= 0x40
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"dense-r00000-000\.safetensors is corrupt \(its sha256 differs"):
        export(ckpt, out)
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp*"))
    report = export(ckpt, out, verify=False)
    assert report["verified_sha256"] is False
    shutil.rmtree(out)
    # unreadable, of the right size, unverified: named by the reader, the half-written export removed
    shard.write_bytes(b"\xff" * len(saved))
    with pytest.raises(ValueError, match="dense-r00000-000.safetensors: cannot be read as safetensors"):
        export(ckpt, out, verify=False)
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp*"))
    shard.write_bytes(saved)
    (ckpt / "shards" / "experts-r00001-000.safetensors").unlink()
    with pytest.raises(ValueError, match=r"experts-r00001-000\.safetensors is missing"):
        export(run, out)
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp*"))
    (ckpt / "meta.json").unlink()
    with pytest.raises(ValueError, match="run directory .* holds no complete checkpoint"):
        export(run, out)
