"""Router losses: the load-balancing loss of transformers' Qwen2-MoE and the ST-MoE z-loss.

Shape legend: T tokens, E routed experts, K experts per token, L MoE layers.

Design choices:
- The load-balancing loss is built from per-layer sufficient statistics (`BalanceStats`): expert
  assignment counts (no gradient) and summed router probabilities (with gradient). Pooling them over
  layers reproduces transformers' `load_balancing_loss_func` exactly (it is pooled over layers, not a
  mean of per-layer losses), and summing the counts over ranks and micro-batches first gives
  global-batch balancing without changing the formula.
- aux = E * sum_i f_i P_i with f_i = assignments_i / rows and P_i = prob_sum_i / rows; sum_i f_i = K,
  so perfectly balanced routing gives aux = K. DeepSpeed and megablocks normalise per layer and by K:
  theirs = ours / K.
- z-loss = mean over the same pooled rows of logsumexp(logits)^2 (ST-MoE, eq. 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe.router import RouterOutput


@dataclass
class BalanceStats:
    """Per-expert sums over the rows of one or more MoE layers."""

    counts_E: torch.Tensor
    """fp32 top-k assignments per expert (no gradient)."""
    prob_sum_E: torch.Tensor
    """fp32 sum of router probabilities per expert (carries the gradient)."""
    rows: torch.Tensor
    """fp32 scalar: number of (unmasked) token rows summed over."""

    def __add__(self, other: BalanceStats) -> BalanceStats:
        return BalanceStats(
            self.counts_E + other.counts_E, self.prob_sum_E + other.prob_sum_E, self.rows + other.rows
        )


def balance_stats(router: RouterOutput, mask_T: torch.Tensor | None = None) -> BalanceStats:
    """Sufficient statistics of one layer's routing; `mask_T` (1 = real token) excludes padding."""
    probs_TE, experts_TK = router.probs_TE, router.experts_TK
    num_experts = probs_TE.shape[-1]
    with torch.no_grad():
        ones_TK = torch.ones_like(experts_TK, dtype=torch.float32)
        if mask_T is not None:
            ones_TK = ones_TK * mask_T.float()[:, None]
        counts_E = torch.zeros(num_experts, dtype=torch.float32, device=probs_TE.device)
        counts_E.scatter_add_(0, experts_TK.reshape(-1), ones_TK.reshape(-1))
    if mask_T is None:
        prob_sum_E = probs_TE.sum(dim=0)
        rows = torch.tensor(float(probs_TE.shape[0]), device=probs_TE.device)
    else:
        m_T = mask_T.float()
        prob_sum_E = (probs_TE * m_T[:, None]).sum(dim=0)
        rows = m_T.sum()
    return BalanceStats(counts_E, prob_sum_E, rows)


def load_balancing_loss(
    stats: Sequence[BalanceStats],
    counts_E: torch.Tensor | None = None,
    count_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' Qwen2-MoE aux loss, pooled over the layers in `stats`.

    Args:
        stats: one entry per MoE layer.
        counts_E, count_rows: optional replacement for the pooled assignment counts and their row count
            (for example summed over data-parallel ranks and micro-batches: global-batch balancing).
            The probabilities always come from `stats`, the local micro-batch, which carries the gradient.
    """
    pooled = stats[0]
    for s in stats[1:]:
        pooled = pooled + s
    num_experts = pooled.prob_sum_E.shape[0]
    if counts_E is None:
        counts_E, count_rows = pooled.counts_E, pooled.rows
    assert count_rows is not None
    f_E = counts_E / count_rows.clamp(min=1)
    p_E = pooled.prob_sum_E / pooled.rows.clamp(min=1)
    return num_experts * (f_E * p_E).sum()


def z_loss(routers: Sequence[RouterOutput], mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss, mean over all layers' (unmasked) token rows of logsumexp(logits)^2."""
    total = routers[0].logits_TE.new_zeros(())
    rows = routers[0].logits_TE.new_zeros(())
    for r in routers:
        z_T = torch.logsumexp(r.logits_TE, dim=-1).square()
        if mask_T is None:
            total = total + z_T.sum()
            rows = rows + z_T.shape[0]
        else:
            total = total + (z_T * mask_T.float()).sum()
            rows = rows + mask_T.float().sum()
    return total / rows.clamp(min=1)
