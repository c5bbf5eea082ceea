"""Top-k softmax router of Qwen2-MoE, computed in fp32.

Shape legend: T tokens, H hidden, E routed experts, K experts per token.

Design choices:
- Logits, softmax and top-k are fp32 whatever the model dtype (transformers computes the logits in
  the model dtype; in fp32 models the two agree bit for bit, in bf16 ours are more precise).
- An optional per-expert `selection_bias_E` (DeepSeek-V3 auxiliary-loss-free balancing) is added to
  the *logits* used to select experts only; the combine weights stay the unbiased probabilities.
  Logits, not probabilities: softmax probabilities spread over tokens about 1/E as much as the
  logits do, so a bias step on them would act E times harder and its useful rate would depend on
  the number of experts (docs/balancing.md measures this). top-k of logits + bias equals top-k of
  softmax(logits + bias): the bias multiplies each expert's odds by exp(bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """What one MoE layer's router decided, kept for the losses and the expert-load metrics."""

    logits_TE: torch.Tensor
    """fp32 router logits (for the z-loss)."""
    probs_TE: torch.Tensor
    """fp32 softmax of the logits (for the load-balancing loss)."""
    experts_TK: torch.Tensor
    """int64 indices of the selected experts."""
    weights_TK: torch.Tensor
    """fp32 combine weights of the selected experts."""


class TopKRouter(nn.Module):
    """softmax(x W^T) in fp32 -> top-k -> optional renormalisation (`norm_topk_prob`)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        # HF name: `mlp.gate.weight` [E, H]
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # Aux-loss-free balancing bias in logit units; zeros (a no-op) unless the trainer updates it.
        self.selection_bias: torch.Tensor
        self.register_buffer("selection_bias", torch.zeros(num_experts), persistent=True)
        self.use_selection_bias = False  # a Python flag, not `.any()`: no host sync in forward

    def _apply(self, fn, recurse=True):
        # Casting the model to bf16 (DeepSpeed does) would round the selection bias too, and its per-step
        # updates (e.g. 1e-3 on values near 1) would vanish below bf16's resolution: it stays fp32.
        super()._apply(fn, recurse)
        self.selection_bias = self.selection_bias.float()
        return self

    def forward(self, x_TH: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        if self.use_selection_bias:
            _, experts_TK = torch.topk(logits_TE + self.selection_bias, self.top_k, dim=-1)
            weights_TK = probs_TE.gather(-1, experts_TK)
        else:
            weights_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, probs_TE, experts_TK, weights_TK)
