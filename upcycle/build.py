"""Turn a `LayerPlan` and the dense FFN of that layer into the Hugging Face tensors of one MoE layer.

Shape legend: H hidden, F dense FFN width, m expert width, N routed experts.

Design choices:
- Tensors are produced one expert at a time (a generator), so a layer's experts never sit in memory
  together; the caller hands each to the shard writer and drops it.
- The dense matrices are held with the down projection transposed (`down_FH`), so that a neuron is
  one row of each matrix and an expert is three `index_select`s; in the output dtype, or in fp32 when
  the plan scales weights (one rounding, after the scale). Copied neurons are bit-exact.
- Every expert is assembled in buffers reused across the layer (`Workspace`); only the tensors
  handed to the writer are new memory. On a VM a page fault costs more than the copy it precedes.
- The random draws of an expert come from its own generator (seed, layer, "neurons", expert), in a
  fixed order (gate rows, up rows, down columns), so any expert can be rebuilt alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moe.config import ModelConfig
from moe.hf import CheckpointReader, empty_shared_expert, expert_key
from upcycle.strategies import LayerPlan, Scales, seeded_generator


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
        cls, reader: CheckpointReader, layer: int, hidden: int, width: int, dtype: torch.dtype
    ) -> DenseFFN:
        """The FFN of `layer` in `dtype` (the working dtype: the output's, or fp32 when scaling)."""
        p = f"model.layers.{layer}.mlp."
        gate = reader.get(p + "gate_proj.weight", (width, hidden))
        up = reader.get(p + "up_proj.weight", (width, hidden))
        down = reader.get(p + "down_proj.weight", (hidden, width)).T
        stats = {"gate": _mean_std(gate), "up": _mean_std(up), "down": _mean_std(down)}
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
    reinit_M: torch.Tensor,
    scales: Scales,
    g: torch.Generator,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [m, H], up [m, H], down [H, m] of one expert, as new tensors in `dtype`.

    Slot i copies dense neuron idx_M[i]; a re-initialised slot gets fresh gate/up rows and down
    column; a new slot (idx -1) gets fresh gate/up rows and a zero down column (no output at init).
    Draws are fp32 N(mean, std) of the dense matrix, in the order gate, up, down.
    """
    m, h = idx_M.numel(), ffn.hidden
    new_M = idx_M < 0
    src_M = idx_M.clamp(min=0)
    fresh = (reinit_M | new_M).nonzero().squeeze(1)
    redrawn = reinit_M.nonzero().squeeze(1)
    out = []
    for name, dense_FH, scale in (
        ("gate", ffn.gate_FH, scales.gate),
        ("up", ffn.up_FH, scales.up),
        ("down", ffn.down_FH, scales.down),
    ):
        rows_MH = torch.index_select(dense_FH, 0, src_M, out=ws.rows[name][:m])
        drawn = redrawn if name == "down" else fresh
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


def moe_layer_tensors(
    plan: LayerPlan,
    ffn: DenseFFN,
    moe: ModelConfig,
    layer: int,
    seed: int,
    router_init_std: float,
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) pairs of MoE layer `layer`: router, routed experts, shared expert and its gate."""
    p = f"model.layers.{layer}.mlp."
    h, n = moe.hidden_size, moe.num_experts
    ws = Workspace(ffn, max(moe.moe_intermediate_size, moe.shared_expert_intermediate_size))
    groups = n // plan.router_group
    router_GH = torch.empty(groups, h).normal_(
        0.0, router_init_std, generator=seeded_generator(seed, layer, "router")
    )
    yield p + "gate.weight", router_GH.repeat_interleave(plan.router_group, dim=0).to(dtype)
    for e in range(n):
        g = seeded_generator(seed, layer, "neurons", e)
        gate, up, down = build_neurons(
            ffn, ws, plan.routed_NM[e], plan.reinit_NM[e], plan.routed_scales, g, dtype
        )
        yield expert_key(layer, e, "gate_proj"), gate
        yield expert_key(layer, e, "up_proj"), up
        yield expert_key(layer, e, "down_proj"), down
    if moe.shared_expert_intermediate_size == 0:
        for key, t in empty_shared_expert(moe, layer):
            yield key, t.to(dtype)
        return
    g = seeded_generator(seed, layer, "neurons", "shared")
    gate, up, down = build_neurons(ffn, ws, plan.shared_S, plan.shared_reinit_S, plan.shared_scales, g, dtype)
    yield p + "shared_expert.gate_proj.weight", gate
    yield p + "shared_expert.up_proj.weight", up
    yield p + "shared_expert.down_proj.weight", down
    if plan.shared_gate_zero:
        shared_gate_1H = torch.zeros(1, h)
    else:
        g = seeded_generator(seed, layer, "shared_gate")
        shared_gate_1H = torch.empty(1, h).normal_(0.0, router_init_std, generator=g)
    yield p + "shared_expert_gate.weight", shared_gate_1H.to(dtype)
