"""Turn a `LayerPlan` and the dense FFN of that layer into the Hugging Face tensors of one MoE layer.

Shape legend: H hidden, F dense FFN width, m expert width, N routed experts.

Design choices:
- Tensors are produced one expert at a time (a generator), so a layer's experts never sit in memory
  together; the caller hands each to the shard writer and drops it. Given a thread pool, a few
  experts are built ahead in parallel (torch ops release the GIL) and still yielded in order.
- The dense matrices are held with the down projection transposed (`down_FH`), so that a neuron is
  one row of each matrix and an expert is three `index_select`s; in the output dtype, or in fp32 when
  the plan scales weights (one rounding, after the scale). Copied neurons are bit-exact.
- Every expert is assembled in buffers reused across the layer (`Workspace`); only the tensors
  handed to the writer are new memory. On a VM a page fault costs more than the copy it precedes.
- The random draws of an expert come from its own generator (seed, layer, "neurons", expert), in a
  fixed order (gate rows, up rows, down columns), so any expert can be rebuilt alone.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TypeVar

import torch

from moe.config import ModelConfig
from moe.hf import CheckpointReader, empty_shared_expert, expert_key
from upcycle.config import RouterInit, UpcycleConfig
from upcycle.strategies import LayerPlan, Scales, seeded_generator

T = TypeVar("T")


@dataclass
class DenseFFN:
    """One layer's dense SwiGLU, neurons as rows, with each matrix's mean and std."""

    gate_FH: torch.Tensor
    up_FH: torch.Tensor
    down_FH: torch.Tensor
    """The transpose of `down_proj.weight [H, F]`."""
    stats: dict[str, tuple[float, float]]
    """(mean, std) of gate, up and down over the whole matrix (for re-initialised neurons)."""

    @classmethod
    def read(
        cls,
        reader: CheckpointReader,
        layer: int,
        hidden: int,
        width: int,
        dtype: torch.dtype,
        with_stats: bool = True,
        pool: Executor | None = None,
    ) -> DenseFFN:
        """The FFN of `layer` in `dtype` (the working dtype: the output's, or fp32 when scaling).

        `with_stats=False` skips the statistics (only re-drawn and new neurons use them); `pool`
        computes the three in parallel.
        """
        p = f"model.layers.{layer}.mlp."
        gate = reader.get(p + "gate_proj.weight", (width, hidden))
        up = reader.get(p + "up_proj.weight", (width, hidden))
        down = reader.get(p + "down_proj.weight", (hidden, width)).T
        stats: dict[str, tuple[float, float]] = {}
        if with_stats:
            mats = {"gate": gate, "up": up, "down": down}
            if pool is None:
                stats = {k: _mean_std(w) for k, w in mats.items()}
            else:
                futures = {k: pool.submit(_mean_std, w) for k, w in mats.items()}
                stats = {k: f.result() for k, f in futures.items()}
        # copies: the reader's tensors are memory-mapped, and every first touch of a page is a fault
        return cls(
            gate.to(dtype, copy=True),
            up.to(dtype, copy=True),
            down.to(dtype, memory_format=torch.contiguous_format, copy=True),
            stats,
        )

    @property
    def hidden(self) -> int:
        return self.gate_FH.shape[1]


def _mean_std(w: torch.Tensor) -> tuple[float, float]:
    # float64 so that the statistics (and hence the re-drawn weights) do not depend on the thread count
    std, mean = torch.std_mean(w.double())
    return float(mean), float(std)


class Workspace:
    """Buffers reused for every expert of a layer: fresh allocations page-fault, which costs more than
    the copies themselves. Only the final tensors handed to the writer are new memory."""

    def __init__(self, ffn: DenseFFN, max_width: int):
        h, dt = ffn.hidden, ffn.gate_FH.dtype
        self.rows = {name: torch.empty(max_width, h, dtype=dt) for name in ("gate", "up", "down")}
        self.noise = torch.empty(max_width, h)  # fp32 draws
        self.noise_cast = torch.empty(max_width, h, dtype=dt)


def build_neurons(
    ffn: DenseFFN,
    ws: Workspace,
    idx_M: torch.Tensor,
    reinit_PM: torch.Tensor,
    scales: Scales,
    g: torch.Generator,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [m, H], up [m, H], down [H, m] of one expert, as new tensors in `dtype`.

    Slot i copies dense neuron idx_M[i]; slot i of matrix p is re-drawn where reinit_PM[p, i] (p:
    gate rows, up rows, down columns); a new slot (idx -1) gets fresh gate/up rows and a zero down
    column (no output at init). Draws are fp32 N(mean, std) of the dense matrix, in the order gate,
    up, down.
    """
    m, h = idx_M.numel(), ffn.hidden
    new_M = idx_M < 0
    src_M = idx_M.clamp(min=0)
    out = []
    for p, (name, dense_FH, scale) in enumerate(
        (
            ("gate", ffn.gate_FH, scales.gate),
            ("up", ffn.up_FH, scales.up),
            ("down", ffn.down_FH, scales.down),
        )
    ):
        rows_MH = torch.index_select(dense_FH, 0, src_M, out=ws.rows[name][:m])
        # a new neuron's gate and up rows are drawn; its down column is zero (set below)
        drawn = (reinit_PM[p] if name == "down" else reinit_PM[p] | new_M).nonzero().squeeze(1)
        if drawn.numel():
            noise = ws.noise[: drawn.numel()].normal_(*ffn.stats[name], generator=g)
            rows_MH.index_copy_(0, drawn, ws.noise_cast[: drawn.numel()].copy_(noise))
        if name == "down" and new_M.any():
            rows_MH[new_M] = 0.0
        if scale != 1.0:
            rows_MH.mul_(scale)
        if name == "down":
            out.append(torch.empty(h, m, dtype=dtype).copy_(rows_MH.T))
        else:
            out.append(torch.empty(m, h, dtype=dtype).copy_(rows_MH))
    return out[0], out[1], out[2]


def work_dtype(plan: LayerPlan, dtype: torch.dtype) -> torch.dtype:
    """fp32 when the plan scales weights (one rounding, after the scale), else the output dtype."""
    unscaled = Scales()
    return dtype if plan.routed_scales == unscaled and plan.shared_scales == unscaled else torch.float32


def needs_stats(plan: LayerPlan) -> bool:
    """Whether any slot is re-drawn or new (and so needs the dense matrices' statistics)."""
    return bool(
        plan.reinit_PNM.any()
        or plan.shared_reinit_PS.any()
        or (plan.routed_NM < 0).any()
        or (plan.shared_S < 0).any()
    )


def router_rows(plan: LayerPlan, moe: ModelConfig, layer: int, cfg: UpcycleConfig) -> torch.Tensor:
    """The router [N, H] in fp32: normal rows (one per group of `plan.router_group`), zeros, or the
    plan's unit centroid directions x router_init_std x sqrt(H) (entries of RMS router_init_std,
    like a normal row's)."""
    n, h, std = moe.num_experts, moe.hidden_size, cfg.router_init_std
    init = RouterInit(cfg.router_init)
    if init is RouterInit.zeros:
        return torch.zeros(n, h)
    if init is RouterInit.centroids:
        if plan.centroids_NH is None:
            raise ValueError("upcycle.router_init=centroids: this layer's plan has no centroids")
        return (plan.centroids_NH * (std * h**0.5)).float()
    groups = n // plan.router_group
    router_GH = torch.empty(groups, h).normal_(
        0.0, std, generator=seeded_generator(cfg.seed, layer, "router")
    )
    return router_GH.repeat_interleave(plan.router_group, dim=0)


def moe_layer_tensors(
    plan: LayerPlan,
    ffn: DenseFFN,
    moe: ModelConfig,
    layer: int,
    cfg: UpcycleConfig,
    dtype: torch.dtype,
    pool: Executor | None = None,
    num_workers: int = 1,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs of MoE layer `layer`: router, routed experts, shared expert and its gate.

    With `pool` (of `num_workers` threads), experts are built in parallel a few ahead, and yielded in
    order; each expert's values do not depend on which thread built it.
    """
    p = f"model.layers.{layer}.mlp."
    h, n, s = moe.hidden_size, moe.num_experts, moe.shared_expert_intermediate_size
    seed = cfg.seed
    free: queue.SimpleQueue[Workspace] = queue.SimpleQueue()
    for _ in range(num_workers if pool is not None else 1):
        free.put(Workspace(ffn, max(moe.moe_intermediate_size, s)))

    def build(idx_M, reinit_PM, scales, which) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ws = free.get()
        try:
            g = seeded_generator(seed, layer, "neurons", which)
            return build_neurons(ffn, ws, idx_M, reinit_PM, scales, g, dtype)
        finally:
            free.put(ws)

    jobs: list[tuple[torch.Tensor, torch.Tensor, Scales, int | str]] = [
        (plan.routed_NM[e], plan.reinit_PNM[:, e], plan.routed_scales, e) for e in range(n)
    ]
    if s:
        jobs.append((plan.shared_S, plan.shared_reinit_PS, plan.shared_scales, "shared"))
    built = _in_order(build, jobs, pool, ahead=num_workers)

    yield p + "gate.weight", router_rows(plan, moe, layer, cfg).to(dtype)
    for e in range(n):
        gate, up, down = next(built)
        yield expert_key(layer, e, "gate_proj"), gate
        yield expert_key(layer, e, "up_proj"), up
        yield expert_key(layer, e, "down_proj"), down
    if s == 0:
        for key, t in empty_shared_expert(moe, layer):
            yield key, t.to(dtype)
        return
    gate, up, down = next(built)
    yield p + "shared_expert.gate_proj.weight", gate
    yield p + "shared_expert.up_proj.weight", up
    yield p + "shared_expert.down_proj.weight", down
    if plan.shared_gate_zero:
        shared_gate_1H = torch.zeros(1, h)
    else:
        g = seeded_generator(seed, layer, "shared_gate")
        shared_gate_1H = torch.empty(1, h).normal_(0.0, cfg.router_init_std, generator=g)
    yield p + "shared_expert_gate.weight", shared_gate_1H.to(dtype)


def _in_order(fn: Callable[..., T], jobs: list[tuple], pool: Executor | None, ahead: int) -> Iterator[T]:
    """fn(*job) for each job, in order; on `pool`, at most `ahead` + 1 jobs submitted at a time."""
    if pool is None:
        for job in jobs:
            yield fn(*job)
        return
    pending: deque[Future[T]] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:  # abandoned (an error downstream): do not leave work queued
            f.cancel()
