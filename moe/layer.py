"""The feed-forward layers: a dense SwiGLU MLP and the Qwen2-MoE sparse block.

Shape legend: B batch, L sequence, T = B*L tokens, H hidden, K experts per token.

Module and parameter names are transformers' (`gate`, `experts.gate_up_proj`, `shared_expert`,
`shared_expert_gate`), so a state dict maps onto a Hugging Face checkpoint by renames only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.experts import RoutedExperts
from moe.router import RouterOutput, TopKRouter


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """y = sum_k w_k E_k(x) + sigmoid(x . w_sg) * S(x): top-k routed experts plus a gated shared expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.gate = TopKRouter(h, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        self.experts = RoutedExperts(cfg.num_experts, h, cfg.moe_intermediate_size, cfg.expert_backend)
        self.shared_expert: SwiGLU | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(h, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def forward(self, x_BLH: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        x_TH = x_BLH.reshape(-1, x_BLH.shape[-1])
        router = self.gate(x_TH)
        y_TH = self.experts(x_TH, router.experts_TK, router.weights_TK)
        if self.shared_expert is not None:
            assert self.shared_expert_gate is not None
            y_TH = y_TH + torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)
        return y_TH.view_as(x_BLH), router
