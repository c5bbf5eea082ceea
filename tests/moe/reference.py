"""Plain for-loop references that every expert backend must match (tests only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loop_experts(x_TH, experts_TK, weights_TK, gate_up_EIH, down_EHI):
    """sum_k w_k * down_e(silu(gate_e x) * up_e x), one token-expert pair at a time, per expert."""
    out_TH = torch.zeros_like(x_TH)
    inter = gate_up_EIH.shape[1] // 2
    for e in range(gate_up_EIH.shape[0]):
        tok, slot = torch.where(experts_TK == e)
        if tok.numel() == 0:
            continue
        g = x_TH[tok] @ gate_up_EIH[e, :inter].T
        u = x_TH[tok] @ gate_up_EIH[e, inter:].T
        y = (F.silu(g) * u) @ down_EHI[e].T
        out_TH = out_TH.index_add(0, tok, y * weights_TK[tok, slot, None].to(y.dtype))
    return out_TH


def topk_route(x_TH, router_EH, top_k, norm_topk_prob):
    probs = (x_TH.double() @ router_EH.double().T).softmax(-1)
    w, idx = probs.topk(top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return w, idx
