"""Resume knows its run (`train/resume_check.py`): another LR is reported and applied, another model is
refused by name before anything is built."""

from __future__ import annotations

import importlib
import json
import shutil
import sys

import pytest

from tests.train.runner import TINY, metrics, train
from train import checkpoint
from train.resume_check import changes, describe, format_value

CONSTANT = ["max_steps=4", "schedule=constant", "schedule.warmup_steps=0"]


@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    """A tiny MoE run stopped with a checkpoint at step 2 of 4 (optim.lr=3e-3, from TINY)."""
    run = tmp_path_factory.mktemp("resume") / "run"
    train(run, *CONSTANT, "stop_at_step=2")
    return run


@pytest.mark.slow
def test_changed_lr_is_reported_once_recorded_and_applied(paused, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(paused, run)
    res = train(run, *CONSTANT, "optim.lr=1e-2")
    assert [ln for ln in res.stdout.splitlines() if ln.startswith("changed on resume")] == [
        "changed on resume: optim.lr 3e-3 -> 1e-2"
    ]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("changed_on_resume") for r in rows] == [None, None, {"optim.lr": [3e-3, 1e-2]}, None]
    assert [r["train/lr"] for r in rows] == pytest.approx([3e-3, 3e-3, 1e-2, 1e-2], rel=1e-9)
    meta = json.loads((checkpoint.list_complete(run)[-1] / "meta.json").read_text())
    assert meta["config"]["optim"]["lr"] == 1e-2  # the next resume compares against the new value


@pytest.mark.slow
def test_another_model_is_refused_naming_the_fields(paused, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in paused.rglob("*")}
    argv = [*TINY, *CONSTANT, f"run_dir={paused}", "model.num_experts=8", "model.moe_intermediate_size=64"]
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exc:
        importlib.import_module("train.__main__").run()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    ckpt = paused / "checkpoints" / "step_00000002"
    assert err == (
        f"finemoe-train: error: cannot resume from {ckpt}: the model differs from the one it was trained "
        "with: model.num_experts 14 -> 8, model.moe_intermediate_size 88 -> 64 (the architecture cannot "
        "change on resume; train this model in another run_dir)\n"
    )
    assert {p: p.stat().st_mtime_ns for p in paused.rglob("*")} == before


@pytest.mark.slow
def test_another_sample_sequence_is_refused_before_anything_is_built(paused, monkeypatch, capsys):
    """Before: `data.seq_len` 32 -> 64 failed in the loader's restore, after the model, DeepSpeed and the
    checkpoint were loaded (minutes at scale)."""
    argv = [*TINY, *CONSTANT, f"run_dir={paused}", "data.seq_len=64"]
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    built = []
    monkeypatch.setattr("train.trainer.build_model", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit) as exc:
        importlib.import_module("train.__main__").run()
    assert exc.value.code == 2 and not built
    ckpt = paused / "checkpoints" / "step_00000002"
    assert capsys.readouterr().err.startswith(
        f"finemoe-train: error: cannot resume from {ckpt}: the data sample sequence differs "
        "(data.seq_len: saved 32, now 64). A resumed run continues its sequence"
    )


# ---- the comparison itself ------------------------------------------------------------------------
MODEL = {"num_experts": 14, "rope_theta": 1e4, "max_position_embeddings": 2048, "router_aux_loss_coef": 0.01}


def test_retunable_fields_ep_size_and_world_size_are_reported():
    meta = {
        "model_config": MODEL,
        "config": {"optim": {"lr": 3e-4}, "parallel": {"ep_size": 2}, "run_dir": "a", "gone": 1},
        "world_size": 2,
    }
    model = MODEL | {"rope_theta": 1e6, "max_position_embeddings": 8192}
    config = {"optim": {"lr": 3e-4}, "parallel": {"ep_size": 1}, "run_dir": "b", "new": 1}
    found = changes(meta, config, model, world_size=1)
    assert describe(found) == (
        "model.rope_theta 1e4 -> 1e6, model.max_position_embeddings 2048 -> 8192, "
        "parallel.ep_size 2 -> 1, world_size 2 -> 1"
    )


def test_every_differing_architecture_field_is_named():
    model = MODEL | {"num_experts": 8, "router_aux_loss_coef": 0.1}
    with pytest.raises(ValueError, match=r"it was trained with: model\.num_experts 14 -> 8 \("):
        changes({"model_config": MODEL}, {}, model, world_size=1)


@pytest.mark.parametrize(
    ("value", "text"),
    [(3e-4, "3e-4"), (1e-2, "1e-2"), (0.5, "0.5"), (0.1, "0.1"), (1e-8, "1e-8"), (2048, "2048"), (True, "true"),
     (None, "null"), ([1, 2], "[1, 2]"), ("cosine", "cosine"), (1e6, "1e6"), (1.5e-05, "1.5e-5")],
)  # fmt: skip
def test_values_print_as_overrides(value, text):
    assert format_value(value) == text
