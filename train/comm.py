"""Communication of the training loop: the process groups' device and every collective the trainer issues.

Rules, enforced here by construction and by `tests/train/test_comm.py`:
- Every tensor handed to a collective lives on `Comm.device`, the device the backend's communicators
  are bound to (`cuda:<local rank>` under NCCL, `cpu` under gloo). NCCL refuses CPU tensors and gloo
  accepts them, so a CPU test cannot catch a misplaced tensor; instead, the collectives here place
  their input on the device themselves and return the reduced copy (no in-place contract to break).
- This is the only module of `train/` (and of `data/`, `upcycle/`, `launch/`) that calls
  `torch.distributed` collectives. The other caller is the expert-parallel all-to-all in
  `moe/dispatch.py`, whose tensors are the activations themselves. DeepSpeed's own collectives (gradient
  reduction, ZeRO gathers) stay inside DeepSpeed.
- The training loop calls these once per optimizer step (or per evaluation or checkpoint), never
  per micro-batch: losses, counts and flags accumulate on the device and are read once.
- Process groups are DeepSpeed's (`train.engine`): data parallel over all ranks, expert parallel
  (EP) in consecutive blocks of `ep_size` ranks, expert-data parallel (EDP) across them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from train import engine as ds
from train.config import check_device


def bind_device(name: str) -> torch.device:
    """The device of this process: `auto` is CUDA when available; on CUDA, the GPU of LOCAL_RANK.

    Call before the process group exists: NCCL binds each communicator to the current CUDA device.
    """
    check_device(name)
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class Comm:
    """Collectives on the process group's device. `group=None` is the default (all-ranks) group."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    @classmethod
    def init(cls, device_name: str = "auto", timeout_s: float = 1800.0) -> Comm:
        """Bind the device, then join (or, without a launcher, create) the default process group, whose
        collectives give up after `timeout_s` (a dead rank must end the job, not hang it)."""
        device = bind_device(device_name)
        ds.init_distributed(device, timeout_s)
        return cls(device)

    def _placed(self, t: torch.Tensor | float | list[float]) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t.detach().to(self.device, copy=True)
        return torch.tensor(t, dtype=torch.float32, device=self.device)

    def sum(self, t: torch.Tensor | float | list[float], group=None) -> torch.Tensor:
        """The element-wise sum over the group's ranks (a new tensor on `self.device`)."""
        out = self._placed(t)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    def max(self, t: torch.Tensor | float | list[float], group=None) -> torch.Tensor:
        out = self._placed(t)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out

    def any(self, flag: torch.Tensor | bool, group=None) -> bool:
        """True if the flag is set on any rank (one host read)."""
        value = flag.float() if isinstance(flag, torch.Tensor) else float(flag)
        return bool(self.max(value, group=group).item() > 0)

    def barrier(self) -> None:
        if self.device.type == "cuda":  # NCCL: say which GPU, or it guesses from the global rank
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def world_size(self, group=None) -> int:
        return dist.get_world_size(group)

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Rank `src`'s `data` on every rank (the others pass None): its length, then its bytes, as
        uint8 tensors on `self.device`. For small payloads (a checkpoint id, a resume plan)."""
        size = torch.tensor([len(data) if self.rank == src and data is not None else 0], device=self.device)
        dist.broadcast(size, src=src)
        n = int(size.item())
        if n == 0:
            return b""
        buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        if self.rank == src:
            assert data is not None
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=src)
        return buf.cpu().numpy().tobytes()
