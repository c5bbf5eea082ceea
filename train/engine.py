"""The one module that imports DeepSpeed: process groups, the engine, and per-parameter state access.

Process groups (DeepSpeed's own utilities, `deepspeed.utils.groups`):
- data parallel (DP): all ranks; dense gradients are averaged over it.
- expert parallel (EP, name `ep_size_{N}`): consecutive blocks of N ranks; routed experts are split over
  it and tokens travel inside it by all-to-all.
- expert data parallel (EDP): ranks holding the same experts (stride N); expert gradients are reduced
  over it (divided by the DP world size, since every expert's gradient already sums the
  contributions of all the EP ranks' tokens).

Design choices:
- DeepSpeed decides whether a model "has MoE layers" by `isinstance(module, deepspeed.moe.layer.MoE)`,
  and only then reduces expert gradients over EDP instead of DP. Our MoE block is pure PyTorch (it
  cannot be expressed by DeepSpeed's MoE: no sigmoid shared gate, always-renormalised top-k), so
  `_MoEGroupsMarker`, a parameter-free MoE subclass, sits beside the model to switch that logic on.
  Expert parameters carry DeepSpeed's flags (`allreduce=False`, `group_name`) and live in optimizer
  groups made by `split_params_into_different_moe_groups_for_optimizer`.
- Checkpoints are per parameter, not DeepSpeed's files: `full_state()` gathers each parameter's fp32
  master weight and Adam moments from the ZeRO partitions (DeepSpeed's `safe_get_full_*` API), so a
  checkpoint resumes under any ZeRO stage, world size or ep_size.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import random
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import (
    groups,
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from moe.dispatch import ExpertParallel
from moe.experts import RoutedExperts

if TYPE_CHECKING:
    from train.comm import Comm

ADAM_STATES = ("exp_avg", "exp_avg_sq")


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join (or, for a plain `python -m train`, create) the default process group. Returns (rank, world).

    On CUDA the caller has already made `device` current (`train.comm.bind_device`): NCCL binds its
    communicators to it.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # single process without a launcher
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if device.type == "cpu":
            _skip_shm_all_reduce_op()
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            verbose=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        atexit.register(_destroy_process_group_at_exit)
    return dist.get_rank(), dist.get_world_size()


finished_cleanly = False
"""Set by the trainer when a run ends normally (every rank got there); reset when one starts."""


def _destroy_process_group_at_exit() -> None:
    """After a run that ended normally, destroy the process groups while the interpreter is whole.

    NCCL then finishes pending operations and does not warn. This stops only the groups nothing else
    references: the expert and data-parallel groups that DeepSpeed's registry and the engine hold live
    on until interpreter finalization, where their gloo threads can abort the process
    (pytorch/pytorch#190489); the commands therefore end with `cli.exit_without_finalizing`, which
    runs this handler first. The teardown waits for pending work of the group, so after a failure,
    when a peer may never take part again, it is skipped: the process exits at once and the launcher
    sees it.
    """
    if dist.is_initialized() and finished_cleanly:
        dist.destroy_process_group()


def _skip_shm_all_reduce_op() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce.

    It serves `deepspeed.comm.inference_all_reduce` only (training collectives go through gloo), yet
    on the CPU accelerator DeepSpeed compiles it at the first start on every machine (~40 s of g++)
    and creates a 66 MB `/dev/shm` segment per rank that it never unlinks: RAM leaked until reboot,
    run after run. DeepSpeed skips the ops it marks incompatible, so mark this one.
    """
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


PORTS = "FINEMOE_PORTS"
"""`LOW-HIGH`: the range `free_port` draws from (default 20000-32000); the test suite gives each of
its parallel workers its own, so two of them never pick the same port for their rendezvous."""


def free_port() -> int:
    """A free TCP port below Linux's ephemeral range (32768+), for a rendezvous (`--master_port`).

    A port the OS hands out for `bind(0)` is ephemeral: between our check and the rendezvous store
    binding it, any outgoing connection (gloo's own, a previous run's) may take it (EADDRINUSE).
    """
    low, high = (int(x) for x in os.environ.get(PORTS, "20000-32000").split("-"))
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {low}-{high}")


class _MoEGroupsMarker(_DeepSpeedMoE):
    """Parameter-free stand-in that makes the DeepSpeed engine treat the model as MoE (see module doc)."""

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)  # deliberately not MoE.__init__: no gate, no experts
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        pass  # the groups exist already (`shard_experts` needs them before the engine is built)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("marker module; never called")


class EngineModule(nn.Module):
    """What DeepSpeed wraps: the model plus the MoE marker. Forward passes keyword batches through."""

    def __init__(self, model: nn.Module, marker: nn.Module | None):
        super().__init__()
        self.model = model
        self.moe_marker = marker

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)


def shard_experts(model: nn.Module, ep_size: int) -> str | None:
    """Keep this rank's slice of every routed-expert tensor and attach the all-to-all dispatcher.

    Returns the expert-parallel group name, or None for a dense model.
    """
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    if not experts:
        return None
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    ep_rank = groups._get_expert_parallel_rank(name)
    for ex in experts:
        local = ex.num_experts // ep_size
        sl = slice(ep_rank * local, (ep_rank + 1) * local)
        if ep_size > 1:
            ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.data[sl].clone())
            ex.down_proj = nn.Parameter(ex.down_proj.data[sl].clone())
            ex.expert_parallel = ExpertParallel(ep_group, ex.num_experts)
        ex.expert_offset = sl.start
        for p in (ex.gate_up_proj, ex.down_proj):
            p.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's flag: reduce over EDP only
            p.group_name = name  # type: ignore[attr-defined]
    return name


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for matrices (experts included), none for biases and norms; MoE split."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    param_groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def build_engine(
    model: nn.Module,
    *,
    ep_group_name: str | None,
    ep_size: int,
    num_experts: int,
    lr: float,
    zero_stage: int,
    micro_batch_size: int,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    lr_lambda: Any = None,
    bf16: bool = False,
    grad_accum_dtype: str = "fp32",
    grad_accum: int = 1,
    grad_clip: float = 1.0,
    reduce_bucket_size: int = 500_000_000,
    overlap_comm: bool = False,
) -> Any:
    """deepspeed.initialize with our AdamW, LR schedule (`lr_lambda`: step -> LR factor; None:
    constant) and MoE groups. The defaults are `OptimConfig`'s and `DeepSpeedConfig`'s. Returns the engine.

    bf16: weights, activations and gradients in bf16; fp32 master weights and Adam moments (DeepSpeed).
    `grad_accum_dtype` ("fp32" | "bf16") is the dtype in which gradients are accumulated over
    micro-batches and reduced over ranks. DeepSpeed's own default is the model dtype (bf16), whose
    8-bit mantissa drops small micro-batch contributions; ours is fp32. With fp32, ZeRO-1 runs
    DeepSpeed's `BF16_Optimizer` (fp32 gradient buffers for the whole model) and ZeRO-2 its ZeRO
    optimizer (fp32 gradient partitions). `reduce_bucket_size`: elements per reduction bucket of
    the ZeRO optimizer (not used by BF16_Optimizer; `train.memory` counts it). `overlap_comm`: ZeRO-2's
    side-stream reduction with a second bucket.
    """
    marker = _MoEGroupsMarker(num_experts, ep_size) if ep_group_name is not None else None
    module = EngineModule(model, marker)
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda or (lambda step: 1.0))
    if zero_stage == 0 and bf16:
        # DeepSpeed 0.19.8 has no ZeRO-0 path for bf16 weights with fp32 gradient accumulation
        # (NotImplementedError), and its bf16-accumulating one was never checked with expert groups.
        raise ValueError("deepspeed.zero_stage=0 with bf16 is not supported for MoE; use zero_stage=1 or 2")
    if grad_accum_dtype not in ("fp32", "bf16"):
        raise ValueError(f"deepspeed.grad_accum_dtype must be fp32 or bf16, got {grad_accum_dtype!r}")
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # Without ZeRO, DeepSpeed averages per-rank gradient norms over DP, which is wrong when ranks hold
        # different experts; we clip ourselves there (`clip_gradients`). ZeRO 1/2 compute it correctly.
        "gradient_clipping": grad_clip if zero_stage > 0 else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        # immediate_grad_update: ZeRO-1's BF16_Optimizer otherwise adds each micro-batch's bf16 `.grad`
        # to its fp32 buffer without clearing it (DeepSpeed 0.19.8), so micro-batch 1 of 8 counts 8 times
        # (tests/train/test_precision.py measures it); the hook moves and frees every gradient instead.
        "bf16": {"enabled": bf16, "immediate_grad_update": True},
        **(
            {
                "data_types": {"grad_accum_dtype": grad_accum_dtype},
                "communication_data_type": grad_accum_dtype,
            }
            if bf16
            else {}
        ),
        "zero_optimization": {
            "stage": zero_stage,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": overlap_comm,
            "reduce_bucket_size": reduce_bucket_size,
        },
    }
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    engine.finemoe_clip = grad_clip if zero_stage == 0 else None
    engine.finemoe_grad_norm = None
    engine.finemoe_ep_group = groups._get_expert_parallel_group(ep_group_name) if ep_group_name else None
    return engine


def clip_gradients(engine: Any, comm: Comm) -> None:
    """Without ZeRO: the true global gradient norm, then clipping. Call after the boundary backward.

    ||g||^2 = sum over dense parameters (identical on every rank after the all-reduce) + sum over all
    experts (each rank holds a disjoint slice: summed over the expert-parallel group). The squares are
    summed on the device in fp64; the norm is read once per optimizer step.
    """
    if engine.finemoe_clip is None or not engine.is_gradient_accumulation_boundary():
        return
    zero = torch.zeros((), dtype=torch.float64, device=comm.device)
    dense, expert, grads = zero, zero, []
    for p in engine.module.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().double().pow(2).sum()
        if getattr(p, "allreduce", True):
            dense = dense + sq
        else:
            expert = expert + sq
    if engine.finemoe_ep_group is not None:
        expert = comm.sum(expert, group=engine.finemoe_ep_group)
    norm = float((dense + expert).sqrt())
    engine.finemoe_grad_norm = norm
    if engine.finemoe_clip > 0 and norm > engine.finemoe_clip:
        for g in grads:
            g.mul_(engine.finemoe_clip / (norm + 1e-6))


def nonfinite_grads_without_zero(engine: Any) -> bool:
    """Without ZeRO, DeepSpeed does not check gradients; `clip_gradients` measured them."""
    norm = engine.finemoe_grad_norm
    return engine.finemoe_clip is not None and norm is not None and not math.isfinite(norm)


def step_was_applied(engine: Any) -> bool:
    """False when DeepSpeed's ZeRO optimizer found non-finite gradients and skipped the update."""
    return bool(getattr(engine, "_step_applied", True))


def grad_norm(engine: Any) -> float:
    """Global gradient norm of the last optimizer step (before clipping)."""
    norm = engine.finemoe_grad_norm if engine.finemoe_clip is not None else engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


@contextlib.contextmanager
def skip_optimizer_step(engine: Any, skip: bool) -> Iterator[None]:
    """Within the block, the torch optimizer's step is a no-op and the LR schedule does not advance.

    Used for steps whose loss was not finite: DeepSpeed still runs its boundary logic (gradient
    reduction, counters) on every rank, but no weight, moment or Adam step count changes.
    """
    if not skip:
        yield
        return
    opt = _torch_optimizer(engine)
    original = opt.step
    last_epoch = engine.lr_scheduler.last_epoch
    opt.step = lambda *a, **k: None  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        opt.step = original  # type: ignore[method-assign]
        set_schedule_position(engine, last_epoch)


def set_schedule_position(engine: Any, steps: int) -> None:
    """Put the LR schedule at `steps` applied updates, and the optimizer's LR where it says."""
    engine.lr_scheduler.last_epoch = steps
    for group, lr in zip(_torch_optimizer(engine).param_groups, engine.lr_scheduler.get_lr()):
        group["lr"] = lr


# ---- per-parameter state (checkpoints) ------------------------------------------------------------


def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the torch optimizer


def full_state(engine: Any, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """fp32 master weight and Adam moments of `param`, gathered over its data-parallel partition group.

    The tensors stay on the parameter's device: a caller copies to the host only what it writes
    (`train.checkpoint` copies each rank's share, so A2.7B's 172 GB checkpoint on 8 ranks moves 172 GB
    to host memory in all, not 478 GB).

    Collective: every rank of the parameter's (E)DP group must call it for the same parameters.
    """
    fp32 = safe_get_full_fp32_param(param)
    if fp32 is not None:
        states = {k: safe_get_full_optimizer_state(param, k) for k in ADAM_STATES}
    else:  # no ZeRO and no bf16: the torch optimizer owns the parameter itself
        fp32 = param.detach()
        st = _torch_optimizer(engine).state.get(param, {})
        states = {k: st.get(k) for k in ADAM_STATES}
    out = {"fp32": fp32.detach().float()}
    for k, v in states.items():
        if v is not None:
            out[k] = v.detach().float()
    return out


def set_full_state(engine: Any, param: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `full_state` (each rank keeps its partition of the given full tensors)."""
    device = param.device
    with torch.no_grad():
        param.copy_(state["fp32"].to(device, param.dtype))
    if hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, state["fp32"].to(device))
        for k in ADAM_STATES:
            if k in state:
                safe_set_full_optimizer_state(param, state[k].to(device), k)
    else:
        opt = _torch_optimizer(engine)
        st = opt.state[param]
        for k in ADAM_STATES:
            if k in state:
                st[k] = state[k].to(device, param.dtype).clone()


def optimizer_step_count(engine: Any) -> int:
    """Adam's bias-correction step, as stored by torch's AdamW."""
    for st in _torch_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def prepare_optimizer_state(engine: Any, step: int) -> None:
    """Create Adam's state (torch makes it lazily at the first step) with the given step count, and link
    DeepSpeed's per-parameter views into it, so that `set_full_state` can fill the moments."""
    opt = _torch_optimizer(engine)
    for group in opt.param_groups:
        for p in group["params"]:  # under ZeRO these are the flat fp32 partitions
            st = opt.state[p]
            st["step"] = torch.tensor(float(step))
            for k in ADAM_STATES:
                st.setdefault(k, torch.zeros_like(p, memory_format=torch.preserve_format))
    link_optimizer_state(engine)


def link_optimizer_state(engine: Any) -> None:
    """(Re)build DeepSpeed's per-parameter views into the Adam state.

    DeepSpeed 0.19.8's ZeRO-1/2 links them lazily after the optimizer step of the *first* parameter
    group only, when the other groups have no state yet, and never again: without this, reading the
    moments of any parameter outside group 0 (our no-decay and expert groups) fails.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def ep_info(group_name: str | None) -> tuple[int, int]:
    """(expert-parallel rank, expert-data-parallel rank) for this process."""
    if group_name is None:
        return 0, dist.get_rank()
    return groups._get_expert_parallel_rank(group_name), groups._get_expert_data_parallel_rank(group_name)


def edp_group(group_name: str) -> Any:
    return groups._get_expert_data_parallel_group(group_name)


def dp_group() -> Any:
    return groups._get_data_parallel_group()
