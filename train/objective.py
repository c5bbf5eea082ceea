"""The training objective: cross-entropy + router losses, with the load-balancing scope of choice.

Shape legend: B batch, L sequence, T = B*L tokens, E routed experts, K experts per token.

- micro_batch: transformers' aux loss over this rank's micro-batch (pooled over MoE layers).
- sequence: the same formula per sequence, averaged over sequences.
- global_batch: expert assignment counts are summed over all data-parallel ranks (all-reduce, no
  gradient) and over the micro-batches of the current optimizer step seen so far, before the loss is
  formed; the router probabilities stay local and carry the gradient. With one micro-batch per step
  this equals the single-process loss over the whole global batch; with gradient accumulation the
  earlier micro-batches of a step see partial counts (the counts of later micro-batches do not exist
  yet when their backward runs), as in Megatron-Core's global aux loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moe.losses import BalanceStats, balance_stats, load_balancing_loss
from moe.model import ModelOutput
from train.config import BalanceScope

if TYPE_CHECKING:
    from train.comm import Comm


@dataclass
class LossTerms:
    loss: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor | None
    z: torch.Tensor | None


class Objective:
    def __init__(
        self, scope: BalanceScope, aux_coef: float, z_coef: float, comm: Comm | None = None, dp_group=None
    ):
        """`comm` (and its `dp_group`) sum the global_batch counts over ranks; None: this process only."""
        self.scope = BalanceScope(scope)
        self.aux_coef, self.z_coef = aux_coef, z_coef
        self.comm, self.dp_group = comm, dp_group
        self._step_counts: torch.Tensor | None = None
        self._step_rows: torch.Tensor | None = None

    def start_step(self) -> None:
        """Forget the counts of the previous optimizer step (global_batch scope)."""
        self._step_counts, self._step_rows = None, None

    def __call__(self, out: ModelOutput) -> LossTerms:
        assert out.ce_loss is not None
        if not out.routers:
            return LossTerms(out.ce_loss, out.ce_loss, None, None)
        aux = self.balance_loss(out)
        z = out.z_loss
        assert z is not None
        return LossTerms(out.ce_loss + self.aux_coef * aux + self.z_coef * z, out.ce_loss, aux, z)

    def balance_loss(self, out: ModelOutput) -> torch.Tensor:
        if self.scope is BalanceScope.micro_batch:
            return load_balancing_loss(out.balance)
        if self.scope is BalanceScope.sequence:
            return self._per_sequence(out)
        pooled = out.balance[0]
        for s in out.balance[1:]:
            pooled = pooled + s
        counts, rows = pooled.counts_E.clone(), pooled.rows.clone()
        if self.comm is not None and self.comm.world_size(self.dp_group) > 1:
            packed = self.comm.sum(torch.cat([counts, rows[None]]), group=self.dp_group)
            counts, rows = packed[:-1], packed[-1]
        if self._step_counts is not None and self._step_rows is not None:
            counts, rows = counts + self._step_counts, rows + self._step_rows
        self._step_counts, self._step_rows = counts, rows
        # the count factor is global; P (with gradient) is over the local rows only
        return load_balancing_loss(out.balance, counts_E=counts, count_rows=rows)

    @staticmethod
    def _per_sequence(out: ModelOutput) -> torch.Tensor:
        batch = out.batch_size
        losses = []
        for b in range(batch):
            stats: list[BalanceStats] = []
            for r in out.routers:
                seq = r.probs_TE.shape[0] // batch
                rows = slice(b * seq, (b + 1) * seq)
                sub = type(r)(r.logits_TE[rows], r.probs_TE[rows], r.experts_TK[rows], r.weights_TK[rows])
                stats.append(balance_stats(sub))
            losses.append(load_balancing_loss(stats))
        return torch.stack(losses).mean()


@torch.no_grad()
def update_selection_bias(routers_modules, load_E_per_layer: list[torch.Tensor], rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

    `load_E_per_layer[l]` are the step's assignment counts (summed over ranks) of MoE layer l; `rate`
    is the step in logit units. The bias is kept at mean zero: top-k ignores a shift common to all
    experts, and without it sign steps drift the mean whenever more experts are under- than over-loaded.
    """
    for router, load_E in zip(routers_modules, load_E_per_layer):
        bias_E = router.selection_bias
        bias_E += rate * torch.sign(load_E.mean() - load_E).to(bias_E)
        bias_E -= bias_E.mean()
        router.use_selection_bias = True
