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
  keeps joining the collectives; a flag reduced after every 64 MiB of gathered state stops every rank
  at the same parameter, every rank raises, the temporary directory is removed and the previous
  checkpoint stays.
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
from train.checkpoint_branches import (  # noqa: F401 (re-exported: the checkpoint API is one module)
    ABANDONED,
    META,
    STEP_PREFIX,
    candidates,
    checkpoint_id,
    checkpoint_root,
    clean_stale,
    damage,
    list_complete,
    move_aside_other_branches,
    prune,
    read_meta,
    resolve_resume,
)
from train.checkpoint_store import CheckpointError

if TYPE_CHECKING:
    from train.comm import Comm

KINDS = ("fp32", *ds.ADAM_STATES)
CHECK_BYTES = 64 * 1024**2
"""A save checks for a failure on any rank after each this much gathered state (and at the end)."""
BUCKET_BYTES = 64 * 1024**2
"""A resume sums this much state over a group in one all-reduce (a larger parameter alone)."""
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
            prune(root, final, keep_last)
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
    since_check = 0
    for n, (name, param) in enumerate(params):
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
        # the same sizes on every rank: every rank checks after the same parameters, and stops there
        since_check += param.numel() * len(KINDS) * 4
        if (since_check >= CHECK_BYTES or n == len(params) - 1) and comm.any(error is not None):
            break
        since_check = 0 if since_check >= CHECK_BYTES else since_check
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
    move_aside_other_branches(root, final.name, parent)  # moved at the run's start; this is a safety net
    os.rename(tmp, final)
    store.fsync_dir(root)
    return stats


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
    """Each rank reads whole files (its share of the group's); contributions are summed over the group,
    one all-reduce per bucket of parameters (with the bucket's failure flag as its last element)."""
    index = store.read_index(ckpt)
    owners = _owners(model)
    params = list(model.named_parameters())
    plans = {n: _logical(n, p, owners.get(n)) for n, p in params}
    files = meta["files"]
    dense_keys = [k for n, _ in params if n not in owners for _, kns in plans[n] for k, _ in kns]
    readers = {"dense": store.GroupReader(ckpt, index, files, dense_keys, comm.rank, comm.world)}
    groups: dict[str, Any] = {"dense": None}
    if owners:
        ep_group_name = _expert_group_name(model)
        _, edp_rank = ds.ep_info(ep_group_name)
        groups["experts"] = ds.edp_group(ep_group_name) if ep_group_name else None
        edp_size = comm.world_size(groups["experts"]) if groups["experts"] is not None else comm.world
        expert_keys = [k for n, _ in params if n in owners for _, kns in plans[n] for k, _ in kns]
        readers["experts"] = store.GroupReader(ckpt, index, files, expert_keys, edp_rank, edp_size)

    # What is stored, checked on every rank before any collective (a group may see what others do not).
    items: dict[str, list[tuple[torch.nn.Parameter, list[list[str]], list[str]]]] = {g: [] for g in readers}
    problem, code = None, 0.0
    for name, param in params:
        reader = readers["dense" if name not in owners else "experts"]
        shape = tuple(param.shape if name not in owners else param.shape[1:])
        kinds, keys = [], []
        for kind, kns in plans[name]:
            present = [k in reader.present for k, _ in kns]
            if not all(present):
                if (kind == "fp32" or any(present)) and problem is None:
                    missing = next(k for (k, _), p in zip(kns, present) if not p)
                    problem, code = f"checkpoint {ckpt}: tensor {missing!r} is missing", 1.0
                continue  # no moments stored (saved before the first optimizer step)
            bad = [k for k, _ in kns if reader.shapes[k] != shape]
            if bad and code < 2:
                got = list(reader.shapes[bad[0]])
                problem, code = (
                    f"checkpoint {ckpt}: {bad[0]} has shape {got}, model expects {list(shape)}",
                    2.0,
                )
            kinds.append(kind)
            keys.append([k for k, _ in kns])
        items["dense" if name not in owners else "experts"].append((param, keys, kinds))
    agreed = int(comm.max(code).item())
    if agreed:
        why = problem or f"checkpoint {ckpt} does not match the model (found by another rank)"
        raise (ValueError if agreed == 2 else CheckpointError)(why)

    ds.prepare_optimizer_state(engine, int(meta.get("adam_step", 0)))
    failure: str | None = None
    for group_name, reader in readers.items():
        for bucket in _buckets(items[group_name], BUCKET_BYTES):
            flat = torch.zeros(sum(p.numel() * len(kinds) for p, _, kinds in bucket) + 1, device=comm.device)
            if failure is None:
                try:
                    at = 0
                    for param, keys, _ in bucket:
                        for per_kind in keys:
                            per = param.numel() // len(per_kind)
                            for i, k in enumerate(per_kind):
                                for start, seg in reader.segments(k):
                                    flat[at + i * per + start : at + i * per + start + seg.numel()].copy_(seg)
                            at += param.numel()
                except Exception as e:  # noqa: BLE001 (damage seen by one rank stops all of them)
                    failure = str(e)
            flat[-1] = float(failure is not None)
            flat = comm.sum(flat, group=groups[group_name])
            if failure is not None or flat[-1].item() > 0:
                failure = failure or f"checkpoint {ckpt} is damaged (found by another rank)"
                continue
            at = 0
            for param, _, kinds in bucket:
                state = {}
                for kind in kinds:
                    state[kind] = flat[at : at + param.numel()].view(param.shape)
                    at += param.numel()
                ds.set_full_state(engine, param, state)
    if comm.any(failure is not None):
        raise CheckpointError(failure or f"checkpoint {ckpt} is damaged (found by another rank)")


def _buckets(items: list[Any], max_bytes: int) -> list[list[Any]]:
    """Consecutive parameters, about `max_bytes` of fp32 state per bucket (a larger one alone)."""
    out: list[list[Any]] = []
    size = max_bytes
    for item in items:
        param, _, kinds = item
        nbytes = param.numel() * len(kinds) * 4
        if size + nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += nbytes
    return out


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
