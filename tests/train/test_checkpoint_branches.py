"""Checkpoints through the trainer: rollbacks make branches, keep_last counts the current one, damaged
checkpoints fall back, and a full disk on one rank of two stops both without a hang."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.train.runner import train
from train import checkpoint

pytestmark = pytest.mark.slow


def meta(ckpt) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


def names(run) -> list[str]:
    return [p.name for p in checkpoint.list_complete(run)]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """4 steps, checkpoints at 2 and 4 (one process)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(run, "max_steps=4", "checkpoint.every=2")
    assert names(run) == ["step_00000002", "step_00000004"]
    return run


def test_rollback_branches_and_keep_last(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    root = run / "checkpoints"
    old4, step2 = meta(root / "step_00000004"), meta(root / "step_00000002")
    (root / ".step_00000009.tmp").mkdir()  # left by a save that was killed

    # roll back to step 2 (as after a loss spike) and save step 4 again, keeping one checkpoint
    res = train(
        run,
        f"checkpoint.resume={root / 'step_00000002'}",
        "max_steps=4",
        "checkpoint.keep_last=1",
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]  # before: OSError "Directory not empty" at the rename
    assert not (root / ".step_00000009.tmp").exists()
    assert names(run) == ["step_00000004"]  # keep_last=1 kept what it wrote
    new4 = meta(root / "step_00000004")
    assert new4["id"] != old4["id"] and new4["parent"] == step2["id"]
    (branch,) = (root / checkpoint.ABANDONED).iterdir()
    assert branch.name.endswith("_restart_from_step_00000002")
    assert [p.name for p in branch.iterdir()] == ["step_00000004"]
    assert meta(branch / "step_00000004") == old4  # the abandoned branch stays, untouched and visible

    # resume=auto continues the branch written last, not the abandoned one
    assert checkpoint.resolve_resume("auto", run) == root / "step_00000004"
    assert f"resumed from {root / 'step_00000002'} at step 2" in res.stdout

    # resume=none in a used directory: a new branch from scratch, the old one moved aside as it starts
    train(run, "checkpoint.resume=none", "max_steps=1")
    assert names(run) == ["step_00000001"] and meta(root / "step_00000001")["parent"] is None
    assert len(list((root / checkpoint.ABANDONED).iterdir())) == 2


def test_a_fresh_start_that_dies_before_saving_leaves_no_old_branch_to_resume(two_checkpoints, tmp_path):
    """`resume=none` moves the old branch aside as it starts, as it moves the old metrics aside. Before,
    the branch moved at the first save: a run that died before it left the old checkpoints in place,
    and `resume=auto` continued them with the fresh run's records in metrics.jsonl."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    res = train(run, "checkpoint.resume=none", "max_steps=3", env={"FINEMOE_FAULT_KILL": "0:2"}, check=False)
    assert res.returncode != 0  # killed as step 2 starts, before any save
    assert names(run) == []
    (branch,) = (run / "checkpoints" / checkpoint.ABANDONED).iterdir()
    assert branch.name.endswith("_restart_from_scratch")
    assert sorted(p.name for p in branch.iterdir()) == ["step_00000002", "step_00000004"]
    train(run, "max_steps=2")  # resume=auto: nothing to resume, a fresh run again
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert meta(run / "checkpoints" / "step_00000002")["parent"] is None


def test_damaged_checkpoints_fall_back_to_the_newest_valid_one(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    root = run / "checkpoints"
    shard = max((root / "step_00000004").rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())

    # truncated: seen from the sizes alone, before anything is read
    shard.write_bytes(bytes(data[:-8]))
    assert checkpoint.resolve_resume("auto", run) == root / "step_00000002"
    with pytest.raises(
        ValueError, match=rf"step_00000004 is damaged: .*{shard.name} is {len(data) - 8} bytes"
    ):
        checkpoint.resolve_resume(str(root / "step_00000004"), run)

    # corrupt (same size): seen by the hash while reading; the trainer falls back to step 2
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = train(run, "max_steps=3")
    assert "sha256 differs" in res.stdout and f"falling back to {root / 'step_00000002'}" in res.stdout
    assert f"resumed from {root / 'step_00000002'} at step 2" in res.stdout
    assert names(run) == ["step_00000002", "step_00000003"]
    assert meta(root / "step_00000003")["parent"] == meta(root / "step_00000002")["id"]


def test_full_disk_on_one_rank_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    """2 processes, experts shared over an expert-data-parallel group of 2: the step-4 save fails on
    rank 1 only (ENOSPC half-way through its first shard). Both ranks raise at once; nothing hangs."""
    run = tmp_path / "run"
    res = train(
        run, "max_steps=4", "checkpoint.every=2", procs=2, env={"FINEMOE_FAULT_ENOSPC": "1:4"}, check=False
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "checkpoint of step 4 failed on rank 1: OSError: [Errno 28] No space left on device" in out
    assert "checkpoint of step 4 failed on another rank" in out  # rank 0
    assert names(run) == ["step_00000002"] and not list((run / "checkpoints").glob(".*tmp"))
    # every rank wrote an equal share of step 2 (dense over both ranks, experts over the EDP group)
    io = meta(run / "checkpoints" / "step_00000002")["io"]
    assert len(io["bytes_per_rank"]) == 2
    assert max(io["bytes_per_rank"]) / min(io["bytes_per_rank"]) < 1.01, io


def fake_checkpoint(root, step: int, ckpt_id: str, parent: str | None):
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "id": ckpt_id, "parent": parent, "files": {}}))
    return path


@pytest.mark.parametrize("keep_last,kept", [(2, ["step_00000100", "step_00000150"]), (1, ["step_00000150"])])
def test_saving_between_two_old_checkpoints(tmp_path, keep_last, kept):
    """The issue's case: [100, 200] on disk, rolled back to 100, saving 150. Before: keep_last deleted
    100 (or, with 1, the new 150 itself) by step number, and resume=auto picked the abandoned 200."""
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 100, "a", None)
    fake_checkpoint(root, 200, "b", "a")
    new = fake_checkpoint(tmp_path / "tmp", 150, "c", "a")  # as `_commit` has it, before the rename
    checkpoint.move_aside_other_branches(root, new.name, "a")
    new.rename(root / new.name)
    checkpoint.prune(root, root / new.name, keep_last)
    assert names(tmp_path) == kept
    assert checkpoint.resolve_resume("auto", tmp_path) == root / "step_00000150"
    (branch,) = (root / checkpoint.ABANDONED).iterdir()
    assert [p.name for p in branch.iterdir()] == ["step_00000200"]


def test_two_rollbacks_that_save_the_same_step_within_a_second_keep_both_branches(tmp_path, monkeypatch):
    """[100 (a), 200 (b)]; back to a, save 200 again (b2); back to a once more, save 200 (b3), all within
    one second. Both abandoned 200s stay visible, in two directories (before: the second move renamed
    onto the first branch's step_00000200 and the save failed)."""
    from datetime import datetime, timezone

    from train import checkpoint_branches

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)

    monkeypatch.setattr(checkpoint_branches, "datetime", Frozen)
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 100, "a", None)
    fake_checkpoint(root, 200, "b", "a")
    for ckpt_id in ("b2", "b3"):
        new = fake_checkpoint(tmp_path / "tmp", 200, ckpt_id, "a")
        checkpoint.move_aside_other_branches(root, new.name, "a")
        new.rename(root / new.name)
    assert meta(root / "step_00000200")["id"] == "b3"
    abandoned = sorted((root / checkpoint.ABANDONED).iterdir())
    assert [p.name for p in abandoned] == [
        "20261130T120000_step_00000200_from_step_00000100",
        "20261130T120000_step_00000200_from_step_00000100_2",
    ]
    assert [meta(p / "step_00000200")["id"] for p in abandoned] == ["b", "b2"]


def test_a_directory_without_meta_json_is_named_for_what_it_is(tmp_path):
    """Only a step_* (or a torn .step_*.tmp) is an incomplete save; a run's checkpoints/ folder and a
    directory that is no checkpoint at all got that message too, which sent users looking for a crash."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for name in ("step_00000002", "step_00000004"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "meta.json").write_text("{}")
    (ckpts / "step_00000006").mkdir()  # no meta.json: the save did not finish
    (ckpts / ".step_00000008.tmp").mkdir()
    (tmp_path / "elsewhere").mkdir()

    def refusal(path) -> str:
        with pytest.raises(ValueError) as e:
            checkpoint.resolve_resume(str(path), run)
        return str(e.value)

    assert refusal(ckpts) == (
        f"{ckpts} is a folder of checkpoints, not a checkpoint: pass its run directory {run} or one of "
        "its step_* folders (the newest complete one is step_00000004)"
    )
    for torn in ("step_00000006", ".step_00000008.tmp"):
        assert refusal(ckpts / torn) == (
            f"checkpoint {ckpts / torn} is incomplete: meta.json is missing (the save did not finish)"
        )
    assert refusal(tmp_path / "elsewhere") == (
        f"{tmp_path / 'elsewhere'} is not a checkpoint (it has no meta.json) nor a run directory "
        "(it has no checkpoints/)"
    )
    assert checkpoint.resolve_resume(str(run), run) == ckpts / "step_00000004"  # what it suggests works
