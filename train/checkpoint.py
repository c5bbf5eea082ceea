"""Checkpoints that survive crashes and change of scale.

Layout of `<run_dir>/checkpoints/step_00000042/`:
- `ep000/, ep001/, ...`: safetensors shards written by the first expert-data-parallel rank of each
  expert-parallel rank. Dense parameters (in `ep000/` only) are stored as `<name>::fp32`,
  `<name>::exp_avg`, `<name>::exp_avg_sq`; routed experts one global expert at a time as
  `<name>.<global expert id>::<state>`, so any ep_size can read them back.
- `buffers.safetensors`: the routers' aux-loss-free selection biases.
- `rng/rank00000.pt`: each rank's RNG states (tensors only; read with `weights_only=True`).
- `meta.json`: step, tokens, data-loader position, config. Written last: a directory without it is
  incomplete and never resumed from.

Everything is written under `.step_XXXXXXXX.tmp/` and renamed when complete; older checkpoints are
deleted only after that, so a crash during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moe.experts import RoutedExperts
from moe.hf import CheckpointReader, ShardedWriter
from moe.router import TopKRouter
from train import engine as ds

if TYPE_CHECKING:
    from train.comm import Comm

META = "meta.json"
STEP_PREFIX = "step_"
SHARD_BYTES = 1024**3


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`auto` -> newest complete checkpoint (or None), `none` -> None, else a checked directory."""
    if resume == "none":
        return None
    if resume == "auto":
        done = list_complete(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if (path / META).is_file():
        return path
    done = list_complete(path)
    if done:  # a run directory
        return done[-1]
    if (path / "checkpoints").is_dir():
        raise ValueError(f"run directory {path} holds no complete checkpoint")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is incomplete: {META} is missing (the save did not finish)")
    raise ValueError(f"checkpoint.resume={resume!r}: no such checkpoint or run directory")


def state_key(name: str, kind: str, expert: int | None = None) -> str:
    """`<param>::<kind>`, or `<param>.<global expert id>::<kind>` for one routed expert's slice."""
    return f"{name}::{kind}" if expert is None else f"{name}.{expert}::{kind}"


class StateReader:
    """The tensors stored in a checkpoint's `ep*/` directories, looked up by parameter and state kind."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self.num_dirs = 0
        self._where: dict[str, CheckpointReader] = {}
        for d in sorted(ckpt.glob("ep*")):
            if d.is_dir():
                reader = CheckpointReader(d)
                self._where |= dict.fromkeys(reader, reader)
                self.num_dirs += 1

    def missing(self, name: str, kind: str, experts: range | None = None) -> list[str]:
        """Keys of (`name`, `kind`) that are not stored; `experts` are global expert ids."""
        keys = [state_key(name, kind)] if experts is None else [state_key(name, kind, e) for e in experts]
        return [k for k in keys if k not in self._where]

    def read(self, name: str, kind: str, experts: range | None = None) -> torch.Tensor:
        """One parameter's state; for routed experts the given global experts stacked along dim 0."""
        if experts is None:
            return self._get(state_key(name, kind))
        return torch.stack([self._get(state_key(name, kind, e)) for e in experts])

    def _get(self, key: str) -> torch.Tensor:
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


def save(
    engine: Any,
    model: torch.nn.Module,
    comm: Comm,
    run_dir: str | Path,
    step: int,
    meta: dict[str, Any],
    ep_group_name: str | None,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    rank = comm.rank
    root = checkpoint_root(run_dir)
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = root / f".{STEP_PREFIX}{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    comm.barrier()

    ep_rank, edp_rank = ds.ep_info(ep_group_name)
    writes = edp_rank == 0
    owners = _owners(model)
    ds.link_optimizer_state(engine)
    writing = ShardedWriter(tmp / f"ep{ep_rank:03d}", max_shard_bytes=SHARD_BYTES) if writes else None
    with writing or contextlib.nullcontext() as writer:
        for name, param in model.named_parameters():
            state = ds.full_state(engine, param)  # collective over the parameter's (E)DP group
            if writer is None:
                continue
            if name in owners:
                offset = _expert_offset(owners[name])
                for k, v in state.items():
                    for i in range(v.shape[0]):
                        writer.add(state_key(name, k, offset + i), v[i])
            elif ep_rank == 0:
                for k, v in state.items():
                    writer.add(state_key(name, k), v)

    if os.environ.get("FINEMOE_FAULT_IN_SAVE") == str(step):  # crash tests: die with the save half done
        os._exit(17)
    if rank == 0:
        buffers = {
            f"{n}.selection_bias": m.selection_bias.detach().cpu()
            for n, m in model.named_modules()
            if isinstance(m, TopKRouter)
        }
        if buffers:
            save_file(buffers, str(tmp / "buffers.safetensors"))
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
    comm.barrier()
    if rank == 0:
        meta = dict(meta, step=step, adam_step=ds.optimizer_step_count(engine), world_size=comm.world)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        os.replace(tmp, final)
        for old in list_complete(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def load(engine: Any, model: torch.nn.Module, ckpt: Path, comm: Comm) -> dict[str, Any]:
    """Collective: restore weights, optimizer moments and step, buffers and RNG; returns meta.json."""
    meta = json.loads((ckpt / META).read_text())
    reader = StateReader(ckpt)
    if not reader.num_dirs:
        raise ValueError(f"checkpoint {ckpt} holds no ep*/ weight directories")
    owners = _owners(model)
    ds.prepare_optimizer_state(engine, int(meta.get("adam_step", 0)))
    for name, param in model.named_parameters():
        off = _expert_offset(owners[name]) if name in owners else 0
        experts = range(off, off + param.shape[0]) if name in owners else None
        if reader.missing(name, "fp32", experts):
            raise ValueError(f"checkpoint {ckpt}: parameter {name!r} is missing")
        state = {}
        for k in ("fp32", *ds.ADAM_STATES):
            if k != "fp32" and reader.missing(name, k, experts):
                continue  # no moments stored (e.g. saved before the first step)
            state[k] = reader.read(name, k, experts)
            if tuple(state[k].shape) != tuple(param.shape):
                raise ValueError(
                    f"checkpoint {ckpt}: {state_key(name, k)} has shape {list(state[k].shape)}, "
                    f"model expects {list(param.shape)}"
                )
        ds.set_full_state(engine, param, state)

    if (ckpt / "buffers.safetensors").is_file():
        buffers = load_file(ckpt / "buffers.safetensors")
        for n, m in model.named_modules():
            if isinstance(m, TopKRouter) and f"{n}.selection_bias" in buffers:
                m.selection_bias.copy_(buffers[f"{n}.selection_bias"])
                m.use_selection_bias = bool(m.selection_bias.any())
    rng = ckpt / "rng" / f"rank{comm.rank:05d}.pt"
    if meta.get("world_size") == comm.world and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return meta


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
