"""Which checkpoint: the directories of a run, its branches, and the choice of what to resume.

`<run_dir>/checkpoints/step_*` holds one *branch*, the chain of checkpoints (by `parent` in meta.json)
that the run continues; other branches are moved to `checkpoints/abandoned/` when a run starts that
leaves them behind (a rollback, a fresh start: `move_aside_other_branches`), together with its logs
(`train.callbacks.jsonl`), and `prune` applies `keep_last` to the current branch only. `candidates` lists what `checkpoint.resume` may restore, newest first, skipping
checkpoints whose files are missing or of the wrong size (a stat per file).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from train import checkpoint_store as store
from train.checkpoint_store import CheckpointError

META = "meta.json"
STEP_PREFIX = "step_"
ABANDONED = "abandoned"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX) :])


def is_step_dir(path: Path) -> bool:
    return path.name.startswith(STEP_PREFIX) and path.name[len(STEP_PREFIX) :].isdigit() and path.is_dir()


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run's current branch, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_step_dir(p) and (p / META).is_file()), key=step_of)


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {META} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {META} is corrupt ({e})") from None


def damage(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be restored, from its meta.json and file sizes alone; None if it looks whole."""
    try:
        meta = read_meta(ckpt)
    except CheckpointError as e:
        return str(e)
    problem = store.size_problem(ckpt, meta.get("files", {}))
    return None if problem is None else f"checkpoint {ckpt} is damaged: {problem}"


def candidates(resume: str, run_dir: str | Path, log: Any = None) -> list[Path]:
    """Checkpoints to try, in order, for `checkpoint.resume`: `auto` (and a run directory) gives the
    current branch's complete checkpoints newest first, skipping (and reporting to `log`) those whose
    files are missing or of the wrong size; `none` gives none; a checkpoint directory gives itself.

    Raises:
        ValueError: an unknown path, an incomplete or damaged checkpoint directory, a directory that
            is no checkpoint (a run's `checkpoints/` folder, say), or a run whose every checkpoint is
            damaged.
    """
    if resume == "none":
        return []
    path = Path(run_dir) if resume == "auto" else Path(resume)
    if resume != "auto" and (path / META).is_file():
        problem = damage(path)
        if problem:
            raise ValueError(problem)
        return [path]
    done = list_complete(path)[::-1]
    if not done:
        if resume == "auto":
            return []
        if (path / "checkpoints").is_dir():
            raise ValueError(f"run directory {path} holds no complete checkpoint")
        if path.is_dir():
            raise ValueError(_not_resumable(path))
        raise ValueError(f"checkpoint.resume={resume!r}: no such checkpoint or run directory")
    good, problems = [], []
    for ckpt in done:
        problem = damage(ckpt)
        if problem:
            problems.append(problem)
            if log is not None:
                print(f"{problem}; skipping it", file=log)
        else:
            good.append(ckpt)
    if not good:
        raise ValueError(f"every checkpoint of {path} is damaged: " + "; ".join(problems))
    return good


def _not_resumable(path: Path) -> str:
    """Why the directory `path`, which has neither meta.json nor checkpoints/, is not a checkpoint."""
    name = path.name
    if is_step_dir(path) or (name.startswith(f".{STEP_PREFIX}") and name.endswith(".tmp")):
        return f"checkpoint {path} is incomplete: {META} is missing (the save did not finish)"
    steps = sorted((p for p in path.iterdir() if is_step_dir(p)), key=step_of)
    if not steps and name != "checkpoints":
        return f"{path} is not a checkpoint (it has no {META}) nor a run directory (it has no checkpoints/)"
    # a run's checkpoints/ (or a branch under abandoned/): the run directory or one step_* is meant
    run = f"its run directory {path.parent} or " if name == "checkpoints" else ""
    complete = [p for p in steps if (p / META).is_file()]
    newest = f"the newest complete one is {complete[-1].name}" if complete else "none is complete"
    return (
        f"{path} is a folder of checkpoints, not a checkpoint: pass {run}one of its step_* folders ({newest})"
    )


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint `checkpoint.resume` names (see `candidates`): the first candidate, or None."""
    found = candidates(resume, run_dir, log=sys.stderr)
    return found[0] if found else None


def lineage(root: Path) -> dict[str, tuple[Path, str | None]]:
    """id -> (directory, parent id) of every complete checkpoint under `root` (current and abandoned).

    Checkpoints written before ids existed get `legacy:<dir name>` and, as parent, the previous one of
    their directory.
    """
    dirs = [p for p in root.iterdir() if is_step_dir(p)] if root.is_dir() else []
    abandoned = root / ABANDONED
    if abandoned.is_dir():
        dirs += [p for b in abandoned.iterdir() if b.is_dir() for p in b.iterdir() if is_step_dir(p)]
    out: dict[str, tuple[Path, str | None]] = {}
    legacy: dict[Path, list[Path]] = {}
    for p in dirs:
        try:
            meta = read_meta(p)
        except CheckpointError:
            continue
        if "id" in meta:
            out[meta["id"]] = (p, meta.get("parent"))
        else:
            legacy.setdefault(p.parent, []).append(p)
    for ps in legacy.values():
        ps.sort(key=step_of)
        for prev, p in zip([None, *ps], ps):
            out[f"legacy:{p.name}"] = (p, None if prev is None else f"legacy:{prev.name}")
    return out


def checkpoint_id(ckpt: Path, meta: dict[str, Any]) -> str:
    return meta.get("id") or f"legacy:{ckpt.name}"


def ancestors(lineage: dict[str, tuple[Path, str | None]], parent: str | None) -> set[Path]:
    seen: set[str] = set()
    out: set[Path] = set()
    while parent is not None and parent in lineage and parent not in seen:
        seen.add(parent)
        path, parent = lineage[parent]
        out.add(path)
    return out


def move_aside_other_branches(root: Path, label: str, parent: str | None) -> None:
    """Move every step directory that is not `parent` or one of its ancestors to
    `abandoned/<time>_<label>_from_<parent>/` (`label`: what continues `parent`, e.g. `restart`)."""
    if not root.is_dir():
        return
    known = lineage(root)
    keep = ancestors(known, parent)
    others = sorted((p for p in root.iterdir() if is_step_dir(p) and p not in keep), key=step_of)
    if not others:
        return
    origin = "scratch" if parent is None else known[parent][0].name if parent in known else parent
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = _new_dir(root / ABANDONED, f"{stamp}_{label}_from_{origin}")
    for p in others:
        os.rename(p, dest / p.name)
    store.fsync_dir(dest)
    names = ", ".join(p.name for p in others)
    print(f"checkpoints: this run continues {origin}; the other branch ({names}) moved to {dest}")


def _new_dir(parent: Path, name: str) -> Path:
    """A directory `parent/name` created now, `name_2`, `name_3`, ... when it exists (two rollbacks to
    the same checkpoint that save the same step within a second)."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = parent / (name if n == 1 else f"{name}_{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def prune(root: Path, final: Path, keep_last: int) -> None:
    """Delete the current branch's checkpoints beyond the newest `keep_last` (save order)."""
    meta = read_meta(final)
    chain = sorted(ancestors(lineage(root), meta.get("parent")) | {final}, key=step_of)
    chain = [p for p in chain if p.parent == root]
    for old in chain[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(run_dir: str | Path) -> list[Path]:
    """Remove temporary directories left by saves that never completed. Returns them."""
    root = checkpoint_root(run_dir)
    stale = [p for p in root.glob(f".{STEP_PREFIX}*.tmp") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale
