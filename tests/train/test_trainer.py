"""The trainer end to end on CPU: exact resume, crash safety, ZeRO stages, wandb, launcher."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.train.runner import ROOT, TINY, logged_steps, losses, metrics, train
from train import checkpoint

pytestmark = pytest.mark.slow


def test_exact_resume_continues_data_and_losses(tmp_path):
    """Stop at step 3, resume: the same records as the uninterrupted run, bit for bit (CPU, fp32),
    every step logged once (a list, not a dict keyed by step, so a re-run step would show)."""
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    train(straight, "max_steps=6")
    train(paused, "max_steps=6", "stop_at_step=3")
    assert [p.name for p in checkpoint.list_complete(paused)] == ["step_00000003"]
    assert [m["step"] for m in metrics(paused)] == [1, 2, 3]
    res = train(paused, "max_steps=6")  # checkpoint.resume=auto
    assert "at step 3" in res.stdout + res.stderr
    a, b = metrics(straight), metrics(paused)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b, strict=True):
        for key in (
            "train/loss",
            "train/ce_loss",
            "train/aux_loss",
            "train/z_loss",
            "train/grad_norm",
            "train/lr",
        ):
            assert y[key] == x[key], (x["step"], key, x[key], y[key])
    meta_a = json.loads((checkpoint.list_complete(straight)[-1] / "meta.json").read_text())
    meta_b = json.loads((checkpoint.list_complete(paused)[-1] / "meta.json").read_text())
    assert meta_a["loader"] == meta_b["loader"]  # same next sample: nothing repeated or skipped
    assert meta_a["tokens_seen"] == meta_b["tokens_seen"] == 6 * 2 * 32


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    res = train(run, "max_steps=6", "checkpoint.every=2", env={"FINEMOE_FAULT_IN_SAVE": "4"}, check=False)
    assert res.returncode == 17  # died inside the step-4 save, after writing the weights
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000002"]
    assert (run / "checkpoints" / ".step_00000004.tmp").exists()  # the torn save, never resumed from
    with pytest.raises(ValueError, match="incomplete: meta.json is missing"):
        checkpoint.resolve_resume(str(run / "checkpoints" / ".step_00000004.tmp"), run)
    train(run, "max_steps=6", "checkpoint.every=2")
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000004", "step_00000006"]


def test_sigterm_while_the_run_is_built_stops_every_rank_before_its_first_step(tmp_path):
    """2 processes, ep 2, resuming step 2; rank 1 alone gets SIGTERM while it builds the run (a
    preemption during a long build). Both ranks stop before the restore and exit 0, nothing is written,
    and the next resume continues (before: rank 1 died of the signal and the job failed)."""
    run = tmp_path / "run"
    train(run, "max_steps=2", "parallel=ep2", procs=2)
    res = train(
        run, "max_steps=4", "parallel=ep2", procs=2, env={"FINEMOE_FAULT_SIGTERM_AT_BUILD": "1"}, check=False
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "stopped by signal 15 before training; nothing new to save" in res.stdout
    assert "resumed from" not in res.stdout  # the grace is not spent on a restore
    assert [p.name for p in checkpoint.list_complete(run)] == ["step_00000002"]
    assert [m["step"] for m in metrics(run)] == [1, 2]
    train(run, "max_steps=4", "parallel=ep2", procs=2)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", *TINY, f"run_dir={run}", "max_steps=400"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and logged_steps(run) < 2:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:  # a failed test leaves no trainer running 400 steps
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    (ckpt,) = checkpoint.list_complete(run)
    stopped_at = json.loads((ckpt / "meta.json").read_text())["step"]
    assert 2 <= stopped_at < 400 and f"stopped by signal {int(signal.SIGTERM)} at step {stopped_at}" in out


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_reduce_the_loss(tmp_path, stage):
    run = tmp_path / f"z{stage}"
    train(run, "max_steps=16", f"deepspeed.zero_stage={stage}", "schedule=constant")
    loss = [m["train/loss"] for m in metrics(run)]
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 0.2, loss


def test_wandb_offline_logs_keys_and_heatmap(tmp_path):
    from tests.train.wandb_reader import history

    run = tmp_path / "run"
    train(run, "max_steps=3", "logging=offline", "logging.heatmap_every=3", "eval_every=3", "eval_batches=2")
    rows = history(run)
    assert len(rows) == 3
    for key in (
        "train/loss",
        "train/aux_loss",
        "train/z_loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "moe/load_max_over_mean",
        "moe/layer01_max_over_mean",
        "eval/loss",
        "eval/perplexity",
    ):
        assert key in rows[-1], key
    assert rows[-1]["moe/expert_load_heatmap/_type"] == '"image-file"'
    assert (run / "expert_load" / "step_00000003.png").stat().st_size > 1000
    assert json.loads(rows[-1]["train/loss"]) == pytest.approx(metrics(run)[-1]["train/loss"])


def test_eval_at_start_scores_the_initial_model_on_the_same_batches(tmp_path):
    """With a negligible learning rate every evaluation, the one before step 1 included, sees the
    same weights: equal losses prove each evaluation rewinds to the same held-out batches."""
    run = tmp_path / "run"
    train(run, "max_steps=3", "eval_every=1", "eval_batches=2", "eval_at_start=true", "optim.lr=1e-12")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["train/tokens_seen"] == 0 and "train/loss" not in rows[0]
    evals = [r["eval/loss"] for r in rows]
    assert evals == pytest.approx([evals[0]] * 4, rel=1e-6, abs=0)
    assert abs(evals[0] - rows[1]["train/ce_loss"]) > 1e-4  # held-out batches, not the training batch


def test_a_fresh_start_in_a_used_run_dir_starts_fresh_logs(tmp_path):
    """`checkpoint.resume=none` in a directory that holds a run: metrics.jsonl holds the new run only
    (before: appended to the old one's, steps 1 2 3 1 2), the old records are kept aside, and wandb
    gets a new run id instead of merging the two."""
    run = tmp_path / "run"
    train(run, "max_steps=3", "logging=offline", "logging.log_every=1")
    first_id = (run / "wandb_id.txt").read_text()
    res = train(run, "max_steps=2", "logging=offline", "logging.log_every=1", "checkpoint.resume=none")
    assert [m["step"] for m in metrics(run)] == [1, 2]
    dropped = [json.loads(ln)["step"] for ln in (run / "metrics_dropped.jsonl").read_text().splitlines()]
    assert dropped == [1, 2, 3] and "3 records after step 0 moved to metrics_dropped.jsonl" in res.stdout
    second_id = (run / "wandb_id.txt").read_text()
    assert second_id != first_id
    train(run, "max_steps=3", "logging=offline", "logging.log_every=1")  # resume=auto: the same wandb run
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    assert (run / "wandb_id.txt").read_text() == second_id


def test_an_evaluation_off_the_logging_grid_is_logged(tmp_path):
    """eval_every=3 with log_every=2: steps 2, 3 (the evaluation), 4, 6 (evaluation and log) and 7
    (the last). Before, step 3's evaluation ran and was dropped."""
    run = tmp_path / "run"
    train(run, "max_steps=7", "eval_every=3", "eval_batches=1", "logging.log_every=2")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]


def test_a_resume_after_a_skipped_update_continues_the_lr_schedule(tmp_path):
    """Step 2's loss is NaN (`FINEMOE_FAULT_NONFINITE`): its update is skipped and the schedule does
    not advance. A run stopped at step 3 and resumed logs the LR of the uninterrupted run (before, the
    resumed schedule was ahead by the skipped step) and the same losses."""
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    common = ("max_steps=5", "schedule.warmup_steps=10")
    fault = {"FINEMOE_FAULT_NONFINITE": "2"}
    train(straight, *common, env=fault)
    train(paused, *common, "stop_at_step=3", env=fault)
    train(paused, *common)
    a, b = metrics(straight), metrics(paused)
    # the LR each step trained with (before, the next step's was logged): 1/11, 2/11, then 2/11 again
    # (step 2's update was skipped and the schedule held), 3/11, 4/11 of optim.lr=3e-3
    lr = [r["train/lr"] / 3e-3 * 11 for r in a]
    assert lr == pytest.approx([1, 2, 2, 3, 4], rel=1e-9) and a[1]["train/skipped_steps"] == 1
    assert [r["train/lr"] for r in b] == [r["train/lr"] for r in a]
    assert [r["train/loss"] for r in b[3:]] == [r["train/loss"] for r in a[3:]]


def test_loss_in_chunks_trains_and_evaluates_like_the_whole_loss(tmp_path):
    """`loss_chunk_tokens=5` (chunks straddling sequences) with activation checkpointing: the same
    losses, gradient norms and evaluation losses as the plain run, step for step (fp32 order)."""
    plain, chunked = tmp_path / "plain", tmp_path / "chunked"
    common = ("max_steps=3", "eval_every=1", "eval_batches=2")
    train(plain, *common)
    train(chunked, *common, "loss_chunk_tokens=5", "activation_checkpointing=true")
    a, b = metrics(plain), metrics(chunked)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        for key in ("train/loss", "train/ce_loss", "train/grad_norm", "eval/loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=0), (x["step"], key)


@pytest.mark.parametrize(
    ("scope", "one_rank"),
    [
        ("sequence", ["deepspeed.grad_accum=2"]),  # per-sequence balance: grouping-free
        ("global_batch", ["deepspeed.micro_batch_size=4"]),  # counts over the whole step's batch
    ],
)
def test_two_ranks_through_launcher_equal_one_rank(tmp_path, scope, one_rank):
    """The trainer users run: deepspeed launcher, 2 ranks, ep_size=2, with the aux and z losses on,
    equals 1 rank over the same global batch. (The loader interleaves samples over ranks, so 1 rank
    with grad_accum=2 groups them differently: only a grouping-free balance scope can match it.)"""
    common = ["max_steps=4", "schedule=constant", f"moe.balance_scope={scope}"]
    common += ["model.router_aux_loss_coef=0.05", "model.router_z_loss_coef=0.01"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, *common, *one_rank)
    train(two, *common, "parallel=ep2", procs=2)
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["train/aux_loss"] > 0 and y["train/z_loss"] > 0
        for key in ("train/loss", "train/aux_loss", "train/z_loss", "train/grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
        assert y["train/tokens_seen"] == x["train/tokens_seen"]


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from train.__main__ import CONFIG_DIR
    from train.config import TrainConfig

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=list(overrides)))


def test_config_errors_fail_before_building():
    """The same checks `python -m train` runs first (Hydra composition, then TrainConfig.validate)."""
    with pytest.raises(ValueError, match="parallel.ep_size=3 must divide the world size 1"):
        _compose("parallel.ep_size=3").validate(world_size=1)
    with pytest.raises(ValueError, match="parallel.ep_size=4 must divide model.num_experts=14"):
        _compose("parallel.ep_size=4").validate(world_size=4)
    with pytest.raises(
        ValueError, match=r"deepspeed.global_batch_size=7 != micro_batch_size=4 x grad_accum=1 x world=2"
    ):
        _compose("deepspeed.global_batch_size=7").validate(world_size=2)
    with pytest.raises(ValueError, match="eval_at_start=true needs eval_every > 0"):
        _compose("eval_at_start=true", "eval_every=0").validate(world_size=1)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        _compose("optim.lrr=1")
    assert _compose("experiment=quickstart_moe").max_steps > 0  # every preset composes


@pytest.mark.parametrize("stage", [0, 1])
def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, stage):
    run = tmp_path / "run"
    res = train(
        run,
        "max_steps=20",
        "optim.lr=1e5",
        "optim.grad_clip=0",
        "schedule=constant",
        "schedule.warmup_steps=0",
        "max_nonfinite_in_a_row=3",
        f"deepspeed.zero_stage={stage}",
        check=False,
    )
    assert res.returncode != 0
    assert (
        "3 steps in a row had a non-finite loss or gradients (max_nonfinite_in_a_row=3); stopping"
        in res.stderr
    )
    rows = metrics(run)
    assert rows[-1]["train/skipped_steps"] == 2 and len(rows) < 20  # the third skip raises before logging


def test_trainer_validates_before_building(tmp_path):
    res = train(tmp_path / "bad", "max_steps=2", "parallel.ep_size=3", check=False)
    assert res.returncode != 0 and "parallel.ep_size=3 must divide the world size 1" in res.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
