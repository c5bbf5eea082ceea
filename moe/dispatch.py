"""Token dispatch: group the T*K (token, expert) pairs by expert, and undo it.

Shape legend: T tokens, H hidden, K experts per token, E routed experts (global), S = T*K dispatched
rows, R rows received by this rank after the expert-parallel all-to-all, W expert-parallel ranks.

Design choices:
- Dropless: every (token, expert) pair is computed; there is no capacity factor.
- Counts come from `scatter_add_` on the device, not `bincount`, so the single-device path never
  synchronises with the host. Expert parallelism needs the split sizes on the host (one sync per
  layer, inherent to `all_to_all_single`).
- `ExpertParallel` is attached to a model from outside (by the trainer); the model code itself is
  single-device. Rank r of the expert-parallel group owns global experts [r*E/W, (r+1)*E/W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DispatchPlan:
    """How the dispatched rows map back to tokens."""

    order_S: torch.Tensor
    """Positions in the flattened [T*K] (token, choice) list, sorted by expert."""
    token_S: torch.Tensor
    """Token index of each dispatched row."""
    counts_E: torch.Tensor
    """int64 rows per expert (on the device)."""
    num_tokens: int


def permute(
    x_TH: torch.Tensor, experts_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, DispatchPlan]:
    """Copy each token once per selected expert, rows grouped by expert id (stable within an expert)."""
    top_k = experts_TK.shape[1]
    flat_S = experts_TK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    token_S = order_S // top_k
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=x_TH.device)
    counts_E.scatter_add_(0, flat_S, torch.ones_like(flat_S))
    return x_TH[token_S], DispatchPlan(order_S, token_S, counts_E, x_TH.shape[0])


def unpermute(y_SH: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weight each expert output by its routing weight and sum the K outputs of every token."""
    w_S = weights_TK.reshape(-1)[plan.order_S].to(y_SH.dtype)
    out_TH = y_SH.new_zeros(plan.num_tokens, y_SH.shape[1])
    return out_TH.index_add_(0, plan.token_S, y_SH * w_S[:, None])


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


@dataclass
class _EPContext:
    send_splits: list[int]
    recv_splits: list[int]
    order_R: torch.Tensor


class ExpertParallel:
    """Moves dispatched rows to the rank that owns their expert and brings the results back."""

    def __init__(self, group: dist.ProcessGroup | None, num_experts: int):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={self.world}")
        self.num_local = num_experts // self.world

    def dispatch(
        self, x_SH: torch.Tensor, counts_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, _EPContext]:
        """Returns this rank's rows grouped by local expert, their counts per local expert, and a context."""
        counts_WL = counts_E.view(self.world, self.num_local)
        recv_WL = torch.empty_like(counts_WL)
        # recv_WL[w, l]: rows that rank w sends to our local expert l
        dist.all_to_all_single(recv_WL, counts_WL.contiguous(), group=self.group)
        send_splits = counts_WL.sum(1).tolist()
        recv_splits = recv_WL.sum(1).tolist()
        x_RH = _AllToAll.apply(x_SH, recv_splits, send_splits, self.group)
        # Received rows are ordered (source rank, local expert); regroup them by local expert.
        local_R = torch.repeat_interleave(
            torch.arange(self.num_local, device=x_SH.device).repeat(self.world), recv_WL.reshape(-1)
        )
        order_R = torch.argsort(local_R, stable=True)
        return x_RH[order_R], recv_WL.sum(0), _EPContext(send_splits, recv_splits, order_R)

    def combine(self, y_RH: torch.Tensor, ctx: _EPContext) -> torch.Tensor:
        """Inverse of `dispatch`: rows come back in this rank's dispatch order."""
        y_unsorted = torch.empty_like(y_RH).index_copy(0, ctx.order_R, y_RH)
        return _AllToAll.apply(y_unsorted, ctx.send_splits, ctx.recv_splits, self.group)
