"""Checkpoints that survive crashes, rollbacks, full disks, preemption and a change of scale.

`<run_dir>/checkpoints/`:
- `step_00000042/`: a complete checkpoint. This directory only ever holds one *branch*: the chain of
  checkpoints that led to the newest save (each meta.json names its `parent`).
- `abandoned/<time>_<new checkpoint>_from_<parent>/step_...`: checkpoints of a branch that a rollback
  left behind (resuming from an older checkpoint, `resume=none` in a used directory). Moved there,
  never deleted, at the first save of the new branch, so no save collides with an existing step.
- `.step_00000042.tmp/`: a save in progress; one left by a crash is removed at the next start.

A checkpoint:
- `shards/`, `index.json`: fp32 master weights and Adam moments, full (unpartitioned) and written in
  equal shares by every rank (`train.checkpoint_store`), so any ZeRO stage, world size or ep_size
  reads them back.
- `buffers.safetensors`: the routers' aux-loss-free selection biases.
- `rng/rank00000.pt`: each rank's RNG states (tensors only; read with `weights_only=True`).
- `meta.json`, written last: step, tokens, data-loader position, config, `id`, `parent`, and every
  other file's size and sha256.

Design choices:
- Atomic: everything goes to `.step_N.tmp/`, each file is fsynced, then the directories, then the
  rename; older checkpoints are pruned only after it. `keep_last` counts the current branch only,
  in save order, so it never deletes what it just wrote nor keeps an abandoned branch instead.
- All or nothing on every rank: each rank records its own failure (a full disk, an I/O error) and
  keeps joining the collectives; one flag reduced per parameter stops every rank at the same point,
  every rank raises, the temporary directory is removed and the previous checkpoint stays.
- Resuming checks the sizes of the chosen checkpoint's files (stat only, rank 0) and, while reading,
  the sha256 of each file read; a damaged checkpoint is reported and the next older one of the
  branch is used.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from moe.experts import RoutedExperts
from moe.hf import CheckpointReader
from moe.router import TopKRouter
from train import checkpoint_store as store
from train import engine as ds
from train.checkpoint_store import CheckpointError

if TYPE_CHECKING:
    from train.comm import Comm

META = "meta.json"
STEP_PREFIX = "step_"
ABANDONED = "abandoned"
KINDS = ("fp32", *ds.ADAM_STATES)
FAULT_IN_SAVE = "FINEMOE_FAULT_IN_SAVE"
"""Tests: the process dies (exit 17) in the save of this step, after writing its shards."""
FAULT_ENOSPC = "FINEMOE_FAULT_ENOSPC"
"""Tests: `<rank>:<step>`: that rank's first shard of that step's save fails half-way with ENOSPC."""


class CheckpointWriteError(RuntimeError):
    """A save failed on some rank; nothing was published and the previous checkpoint is intact."""


@dataclass
class Saved:
    path: Path
    id: str
    bytes_written: int
    """By this rank."""
    seconds: float


@dataclass
class Restored:
    path: Path
    id: str
    meta: dict[str, Any]


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX) :])


def _is_step_dir(path: Path) -> bool:
    return path.name.startswith(STEP_PREFIX) and path.name[len(STEP_PREFIX) :].isdigit() and path.is_dir()


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run's current branch, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_step_dir(p) and (p / META).is_file()), key=_step_of)


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
        ValueError: an unknown path, an incomplete or damaged checkpoint directory, or a run whose
            every checkpoint is damaged.
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
            raise ValueError(f"checkpoint {path} is incomplete: {META} is missing (the save did not finish)")
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


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint `checkpoint.resume` names (see `candidates`): the first candidate, or None."""
    found = candidates(resume, run_dir, log=sys.stderr)
    return found[0] if found else None


def state_key(name: str, kind: str, expert: int | None = None) -> str:
    """`<param>::<kind>`, or `<param>.<global expert id>::<kind>` for one routed expert's slice."""
    return f"{name}::{kind}" if expert is None else f"{name}.{expert}::{kind}"


class StateReader:
    """The tensors of a checkpoint, looked up by parameter and state kind (format 2, or format 1's
    `ep*/` directories). Reads lazily: one parameter in memory at a time."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self.num_dirs = 0
        self._indexed: store.IndexedTensors | None = None
        self._where: dict[str, CheckpointReader] = {}
        if (ckpt / store.INDEX).is_file():
            self._indexed = store.IndexedTensors(ckpt)
            return
        for d in sorted(ckpt.glob("ep*")):
            if d.is_dir():
                reader = CheckpointReader(d)
                self._where |= dict.fromkeys(reader, reader)
                self.num_dirs += 1

    def _has(self, key: str) -> bool:
        return key in self._indexed if self._indexed is not None else key in self._where

    def missing(self, name: str, kind: str, experts: range | None = None) -> list[str]:
        """Keys of (`name`, `kind`) that are not stored; `experts` are global expert ids."""
        keys = [state_key(name, kind)] if experts is None else [state_key(name, kind, e) for e in experts]
        return [k for k in keys if not self._has(k)]

    def read(self, name: str, kind: str, experts: range | None = None) -> torch.Tensor:
        """One parameter's state; for routed experts the given global experts stacked along dim 0."""
        if experts is None:
            return self._get(state_key(name, kind))
        return torch.stack([self._get(state_key(name, kind, e)) for e in experts])

    def _get(self, key: str) -> torch.Tensor:
        if self._indexed is not None:
            return self._indexed.get(key)
        if key not in self._where:
            raise ValueError(f"checkpoint {self.ckpt}: tensor {key!r} is missing")
        return self._where[key].get(key)


def _expert_offset(module: RoutedExperts) -> int:
    return int(getattr(module, "expert_offset", 0))


def _owners(model: torch.nn.Module) -> dict[str, RoutedExperts]:
    return {
        f"{n}.{p}": m
        for n, m in model.named_modules()
        if isinstance(m, RoutedExperts)
        for p in ("gate_up_proj", "down_proj")
    }


def _logical(
    name: str, param: torch.Tensor, owner: RoutedExperts | None
) -> list[tuple[str, list[tuple[str, int]]]]:
    """Per state kind, the logical tensors of one parameter on this rank: (key, numel) each."""
    if owner is None:
        return [(k, [(state_key(name, k), param.numel())]) for k in KINDS]
    off, per = _expert_offset(owner), param[0].numel()
    return [(k, [(state_key(name, k, off + i), per) for i in range(param.shape[0])]) for k in KINDS]


# ---- save ----------------------------------------------------------------------------------------


def save(
    engine: Any,
    model: torch.nn.Module,
    comm: Comm,
    run_dir: str | Path,
    step: int,
    meta: dict[str, Any],
    ep_group_name: str | None,
    keep_last: int,
    parent: str | None = None,
) -> Saved:
    """Collective: every rank calls it. `parent` is the id of the checkpoint this state continues
    (restored or last saved; None for a fresh start). Returns the new checkpoint.

    Raises:
        CheckpointWriteError: on every rank, when any rank failed; nothing was published.
    """
    t0 = time.perf_counter()
    root = checkpoint_root(run_dir)
    name = f"{STEP_PREFIX}{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    error: BaseException | None = None
    if comm.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            for sub in (store.SHARDS, "rng", "manifest"):
                (tmp / sub).mkdir(parents=True)
        except OSError as e:
            error = e
    ckpt_id = comm.broadcast_bytes(f"{step:08d}-{uuid.uuid4().hex[:12]}".encode() if comm.rank == 0 else None)
    _agree(comm, error, step, tmp)

    fail = os.environ.get(FAULT_ENOSPC) == f"{comm.rank}:{step}"
    writers, error = _write_state(engine, model, comm, tmp, ep_group_name, fail)
    if os.environ.get(FAULT_IN_SAVE) == str(step):  # crash tests: die with the save half done
        os._exit(17)
    if error is None:
        try:
            _write_rank_files(model, comm, tmp, writers, t0)
        except Exception as e:  # noqa: BLE001 (reported on every rank by _agree)
            error = e
    _agree(comm, error, step, tmp)

    if comm.rank == 0:
        try:
            stats = _commit(tmp, final, root, dict(meta, step=step), engine, comm, ckpt_id.decode(), parent)
            _prune(root, final, keep_last)
            gb = sum(stats["bytes_per_rank"]) / 1e9
            print(
                f"checkpoint {final}: {gb:.3f} GB from {comm.world} ranks, {max(stats['seconds_per_rank']):.1f} s "
                f"(slowest rank), committed at {time.perf_counter() - t0:.1f} s"
            )
        except Exception as e:  # noqa: BLE001
            error = e
    _agree(comm, error, step, tmp)
    mine = sum(w.bytes_written for w in writers)
    return Saved(final, ckpt_id.decode(), mine, time.perf_counter() - t0)


def _agree(comm: Comm, error: BaseException | None, step: int, tmp: Path) -> None:
    """Raise on every rank if any rank failed (after rank 0 removed the temporary directory)."""
    if not comm.any(error is not None):
        return
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise CheckpointWriteError(
            f"checkpoint of step {step} failed on rank {comm.rank}: {type(error).__name__}: {error}; "
            "nothing was published, the previous checkpoint is intact"
        ) from error
    raise CheckpointWriteError(
        f"checkpoint of step {step} failed on another rank (see its error); nothing was published, "
        "the previous checkpoint is intact"
    )


def _write_state(
    engine: Any, model: torch.nn.Module, comm: Comm, tmp: Path, ep_group_name: str | None, fail: bool
) -> tuple[list[store.SegmentWriter], BaseException | None]:
    """This rank's share of every parameter's state, into its shard files. Collective."""
    owners = _owners(model)
    params = list(model.named_parameters())
    dense_sizes = [kn for n, p in params if n not in owners for _, kns in _logical(n, p, None) for kn in kns]
    expert_sizes = [
        kn for n, p in params if n in owners for _, kns in _logical(n, p, owners[n]) for kn in kns
    ]
    _, edp_rank = ds.ep_info(ep_group_name)
    dense_plan = store.SharePlan(dense_sizes, comm.rank, comm.world)
    dense = store.SegmentWriter(tmp, "dense", comm.rank, fail=fail)
    writers = [dense]
    experts = None
    if owners:
        edp_size = comm.world_size(ds.edp_group(ep_group_name)) if ep_group_name else comm.world
        expert_plan = store.SharePlan(expert_sizes, edp_rank, edp_size)
        experts = store.SegmentWriter(tmp, "experts", comm.rank, fail=fail)
        writers.append(experts)
    ds.link_optimizer_state(engine)
    error: BaseException | None = None
    for name, param in params:
        state = ds.full_state(engine, param)  # collective over the parameter's (E)DP group
        if error is None:
            try:
                owner = owners.get(name)
                writer, plan = (dense, dense_plan) if owner is None else (experts, expert_plan)
                assert writer is not None
                for kind, keys in _logical(name, param, owner):
                    if kind not in state:
                        continue
                    flat = state[kind].reshape(len(keys), -1)
                    shape = list(param.shape if owner is None else param.shape[1:])
                    for i, (key, _) in enumerate(keys):
                        got = plan.get(key)
                        if got is not None:
                            # slice first, then copy: only this rank's share goes to the host
                            writer.add(key, shape, got[0], flat[i, got[0] : got[1]].to("cpu", copy=True))
            except Exception as e:  # noqa: BLE001 (kept, and reported on every rank)
                error = e
        del state
        if comm.any(error is not None):  # every rank stops at the same parameter
            break
    for w in writers:
        if error is None:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001
                error = e
        else:
            w.abandon()
    return writers, error


def _write_rank_files(
    model: torch.nn.Module, comm: Comm, tmp: Path, writers: list[store.SegmentWriter], t0: float
) -> None:
    """RNG state (and, on rank 0, the routers' buffers), then this rank's manifest."""
    files: dict[str, dict[str, Any]] = {}
    shapes: dict[str, list[int]] = {}
    for w in writers:
        files |= w.files
        shapes |= w.shapes
    buf = io.BytesIO()
    torch.save(_rng_state(), buf)
    rel = f"rng/rank{comm.rank:05d}.pt"
    files[rel] = {"bytes": buf.tell(), "sha256": store.write_file(tmp / rel, buf.getbuffer())}
    if comm.rank == 0:
        buffers = {
            f"{n}.selection_bias": m.selection_bias.detach().cpu()
            for n, m in model.named_modules()
            if isinstance(m, TopKRouter)
        }
        if buffers:
            data = safetensors_bytes(buffers)
            files["buffers.safetensors"] = {
                "bytes": len(data),
                "sha256": store.write_file(tmp / "buffers.safetensors", data),
            }
    manifest = {
        "rank": comm.rank,
        "files": files,
        "shapes": shapes,
        "bytes_written": sum(e["bytes"] for e in files.values()),
        "seconds": time.perf_counter() - t0,
    }
    store.write_file(tmp / "manifest" / f"r{comm.rank:05d}.json", json.dumps(manifest).encode())


def _commit(
    tmp: Path,
    final: Path,
    root: Path,
    meta: dict[str, Any],
    engine: Any,
    comm: Comm,
    ckpt_id: str,
    parent: str | None,
) -> dict[str, Any]:
    """Rank 0: index.json and meta.json, fsyncs, the old branch moved aside, the rename."""
    manifests = [json.loads((tmp / "manifest" / f"r{r:05d}.json").read_text()) for r in range(comm.world)]
    index, files = store.merge_manifests(manifests)
    data = json.dumps(index, indent=1).encode()
    files[store.INDEX] = {"bytes": len(data), "sha256": store.write_file(tmp / store.INDEX, data)}
    stats = {
        "bytes_per_rank": [m["bytes_written"] for m in manifests],
        "seconds_per_rank": [round(m["seconds"], 3) for m in manifests],
    }
    meta = dict(
        meta,
        format=store.VERSION,
        id=ckpt_id,
        parent=parent,
        saved_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        adam_step=ds.optimizer_step_count(engine),
        world_size=comm.world,
        io=stats,
        files=dict(sorted(files.items())),
    )
    shutil.rmtree(tmp / "manifest")
    for sub in (store.SHARDS, "rng"):
        store.fsync_dir(tmp / sub)
    store.write_file(tmp / META, (json.dumps(meta, indent=2, default=str) + "\n").encode())
    store.fsync_dir(tmp)
    _move_aside_other_branches(root, final, parent)
    os.rename(tmp, final)
    store.fsync_dir(root)
    return stats


# ---- branches ------------------------------------------------------------------------------------


def _lineage(root: Path) -> dict[str, tuple[Path, str | None]]:
    """id -> (directory, parent id) of every complete checkpoint under `root` (current and abandoned).

    Checkpoints written before ids existed get `legacy:<dir name>` and, as parent, the previous one of
    their directory.
    """
    dirs = [p for p in root.iterdir() if _is_step_dir(p)] if root.is_dir() else []
    abandoned = root / ABANDONED
    if abandoned.is_dir():
        dirs += [p for b in abandoned.iterdir() if b.is_dir() for p in b.iterdir() if _is_step_dir(p)]
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
        ps.sort(key=_step_of)
        for prev, p in zip([None, *ps], ps):
            out[f"legacy:{p.name}"] = (p, None if prev is None else f"legacy:{prev.name}")
    return out


def checkpoint_id(ckpt: Path, meta: dict[str, Any]) -> str:
    return meta.get("id") or f"legacy:{ckpt.name}"


def _ancestors(lineage: dict[str, tuple[Path, str | None]], parent: str | None) -> set[Path]:
    seen: set[str] = set()
    out: set[Path] = set()
    while parent is not None and parent in lineage and parent not in seen:
        seen.add(parent)
        path, parent = lineage[parent]
        out.add(path)
    return out


def _move_aside_other_branches(root: Path, final: Path, parent: str | None) -> None:
    """Move every step directory that is not an ancestor of the new checkpoint to `abandoned/`."""
    keep = _ancestors(_lineage(root), parent)
    others = sorted((p for p in root.iterdir() if _is_step_dir(p) and p not in keep), key=_step_of)
    if not others:
        return
    origin = "scratch"
    if parent is not None:
        lineage = _lineage(root)
        origin = lineage[parent][0].name if parent in lineage else parent
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = root / ABANDONED / f"{stamp}_{final.name}_from_{origin}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in others:
        os.rename(p, dest / p.name)
    store.fsync_dir(dest)
    names = ", ".join(p.name for p in others)
    print(f"checkpoints: {final.name} continues {origin}; the other branch ({names}) moved to {dest}")


def _prune(root: Path, final: Path, keep_last: int) -> None:
    """Delete the current branch's checkpoints beyond the newest `keep_last` (save order)."""
    lineage = _lineage(root)
    meta = read_meta(final)
    chain = sorted(_ancestors(lineage, meta.get("parent")) | {final}, key=_step_of)
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


# ---- restore -------------------------------------------------------------------------------------


def restore(
    engine: Any, model: torch.nn.Module, resume: str, run_dir: str | Path, comm: Comm
) -> Restored | None:
    """Collective: restore `checkpoint.resume`, falling back to older checkpoints of the branch when
    one is damaged (missing, truncated or corrupt files). Returns None when there is nothing to resume.

    Rank 0 removes stale temporary directories, chooses the candidates (stat only) and tells the
    others; every rank then reads its share.

    Raises:
        ValueError: the same on every rank (see `candidates`), or when no candidate could be read.
    """
    plan: dict[str, Any] = {}
    if comm.rank == 0:
        for p in clean_stale(run_dir):
            print(f"removed {p}: a save that never completed")
        try:
            plan = {"candidates": [str(p) for p in candidates(resume, run_dir, log=sys.stdout)]}
        except ValueError as e:
            plan = {"error": str(e)}
    plan = json.loads(comm.broadcast_bytes(json.dumps(plan).encode() if comm.rank == 0 else None))
    if "error" in plan:
        raise ValueError(plan["error"])
    found = [Path(p) for p in plan["candidates"]]
    problems = []
    for i, ckpt in enumerate(found):
        try:
            meta = load(engine, model, ckpt, comm)
            return Restored(ckpt, checkpoint_id(ckpt, meta), meta)
        except CheckpointError as e:
            problems.append(str(e))
            if comm.rank == 0:
                after = (
                    f"falling back to {found[i + 1]}" if i + 1 < len(found) else "no older checkpoint left"
                )
                print(f"cannot restore {ckpt}: {e}; {after}")
    if problems:
        raise ValueError("no checkpoint could be restored: " + "; ".join(problems))
    return None


def load(engine: Any, model: torch.nn.Module, ckpt: Path, comm: Comm) -> dict[str, Any]:
    """Collective: restore weights, optimizer moments and step, buffers and RNG; returns meta.json.

    Raises:
        CheckpointError: on every rank, when any rank found the checkpoint damaged.
        ValueError: a checkpoint of another model (shapes, parameters).
    """
    meta = read_meta(ckpt)
    if meta.get("format") == store.VERSION:
        _load_tensors(engine, model, ckpt, meta, comm)
    else:
        _load_tensors_v1(engine, model, ckpt, meta)
    path = ckpt / "buffers.safetensors"
    if path.is_file():
        buffers = load_file(path)
        for n, m in model.named_modules():
            if isinstance(m, TopKRouter) and f"{n}.selection_bias" in buffers:
                m.selection_bias.copy_(buffers[f"{n}.selection_bias"])
                m.use_selection_bias = bool(m.selection_bias.any())
    rng = ckpt / "rng" / f"rank{comm.rank:05d}.pt"
    if meta.get("world_size") == comm.world and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta


def _load_tensors(engine: Any, model: torch.nn.Module, ckpt: Path, meta: dict[str, Any], comm: Comm) -> None:
    """Each rank reads whole files (its share of the group's), contributions are summed over the group."""
    index = store.read_index(ckpt)
    owners = _owners(model)
    params = list(model.named_parameters())
    plans = {n: _logical(n, p, owners.get(n)) for n, p in params}
    files = meta["files"]
    dense_keys = [k for n, _ in params if n not in owners for _, kns in plans[n] for k, _ in kns]
    dense = store.GroupReader(ckpt, index, files, dense_keys, comm.rank, comm.world)
    experts, edp = None, None
    if owners:
        ep_group_name = _expert_group_name(model)
        _, edp_rank = ds.ep_info(ep_group_name)
        edp = ds.edp_group(ep_group_name) if ep_group_name else None
        edp_size = comm.world_size(edp) if edp is not None else comm.world
        expert_keys = [k for n, _ in params if n in owners for _, kns in plans[n] for k, _ in kns]
        experts = store.GroupReader(ckpt, index, files, expert_keys, edp_rank, edp_size)
    ds.prepare_optimizer_state(engine, int(meta.get("adam_step", 0)))
    failure: str | None = None
    for name, param in params:
        owner = owners.get(name)
        reader, group = (dense, None) if owner is None else (experts, edp)
        assert reader is not None
        shape = tuple(param.shape if owner is None else param.shape[1:])
        state: dict[str, torch.Tensor] = {}
        for kind, keys in plans[name]:
            present = [k in reader.present for k, _ in keys]
            if not all(present):
                if kind == "fp32" or any(present):
                    missing = next(k for (k, _), p in zip(keys, present) if not p)
                    raise CheckpointError(f"checkpoint {ckpt}: tensor {missing!r} is missing")
                continue  # no moments stored (saved before the first optimizer step)
            for k, _ in keys:
                if reader.shapes[k] != shape:
                    raise ValueError(
                        f"checkpoint {ckpt}: {k} has shape {list(reader.shapes[k])}, model expects {list(shape)}"
                    )
            full = torch.zeros(param.numel(), dtype=torch.float32, device=comm.device)
            if failure is None:
                try:
                    per = param.numel() // len(keys)
                    for i, (k, _) in enumerate(keys):
                        for start, seg in reader.segments(k):
                            at = i * per + start
                            full[at : at + seg.numel()].copy_(seg)
                except Exception as e:  # noqa: BLE001 (damage seen by one rank stops all of them)
                    failure = str(e)
            state[kind] = comm.sum(full, group=group).view(param.shape)
        if comm.any(failure is not None):
            raise CheckpointError(failure or f"checkpoint {ckpt} is damaged (found by another rank)")
        ds.set_full_state(engine, param, state)


def _expert_group_name(model: torch.nn.Module) -> str | None:
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            return getattr(m.gate_up_proj, "group_name", None)
    return None


def _load_tensors_v1(engine: Any, model: torch.nn.Module, ckpt: Path, meta: dict[str, Any]) -> None:
    """Format 1 (`ep*/` directories written by the first EDP rank of each EP rank): every rank reads all."""
    reader = StateReader(ckpt)
    if not reader.num_dirs:
        raise CheckpointError(f"checkpoint {ckpt} holds no ep*/ weight directories")
    owners = _owners(model)
    ds.prepare_optimizer_state(engine, int(meta.get("adam_step", 0)))
    for name, param in model.named_parameters():
        off = _expert_offset(owners[name]) if name in owners else 0
        experts = range(off, off + param.shape[0]) if name in owners else None
        if reader.missing(name, "fp32", experts):
            raise CheckpointError(f"checkpoint {ckpt}: parameter {name!r} is missing")
        state = {}
        for k in KINDS:
            if k != "fp32" and reader.missing(name, k, experts):
                continue
            state[k] = reader.read(name, k, experts)
            if tuple(state[k].shape) != tuple(param.shape):
                raise ValueError(
                    f"checkpoint {ckpt}: {state_key(name, k)} has shape {list(state[k].shape)}, "
                    f"model expects {list(param.shape)}"
                )
        ds.set_full_state(engine, param, state)


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(py[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
