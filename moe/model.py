"""Qwen2 decoder whose MLP is dense or a fine-grained mixture of experts, layer by layer.

Shape legend: B batch, L sequence, H hidden, N query heads, G key/value heads, D head dim, V vocab,
T = B*L tokens.

Design choices:
- Numerics follow transformers' Qwen2 / Qwen2-MoE exactly in fp32 (RMSNorm in fp32, RoPE tables in
  fp32, SDPA attention), so checkpoints move between the two without drift.
- Model code is single-device. Expert parallelism, ZeRO and activation checkpointing policy are
  applied from outside (train/); the only hooks here are `gradient_checkpointing` and
  `loss_chunk_tokens`.
- The vocabulary-wide tensors of the loss (bf16 logits, the saved fp32 log-softmax, and in backward
  the fp32 gradients of the loss and of the log-softmax: 14 V bytes per token, 34.9 GB per rank for
  A2.7B at 4 x 4096 tokens) are the largest activations once the layers are checkpointed. With
  `loss_chunk_tokens` = C the loss runs C tokens at a time, each chunk's logits recomputed in
  backward (`chunked_cross_entropy`): they are then C x 6 V bytes in bf16, whatever the micro-batch,
  for one more LM-head matmul per token.
- `forward` returns the router decisions of every MoE layer, never stores them in globals: the
  trainer forms the losses and the expert-load metrics from them.
- Targets are aligned with the inputs (a packed block of L+1 tokens gives inputs [:-1], targets [1:]);
  -100 marks positions without a loss.
- Build on the meta device and call `init_weights()` after `to_empty()` to size large models cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from moe.config import ModelConfig
from moe.layer import MoEBlock, SwiGLU
from moe.losses import BalanceStats, balance_stats, load_balancing_loss, z_loss
from moe.router import RouterOutput, TopKRouter

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids_BL: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, L, D], computed in fp32 then cast (as transformers does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs_BLd = position_ids_BL[..., None].float() * inv_freq.to(position_ids_BL.device)
    emb_BLD = torch.cat((freqs_BLd, freqs_BLd), dim=-1)
    return emb_BLD.cos().to(dtype), emb_BLD.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BNLD: torch.Tensor, cos_BLD: torch.Tensor, sin_BLD: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BLD[:, None], sin_BLD[:, None]
    return x_BNLD * cos + _rotate_half(x_BNLD) * sin


class Attention(nn.Module):
    """Grouped-query attention with q/k/v bias (Qwen2), causal, through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x_BLH, cos_BLD, sin_BLD, mask_B1LL: torch.Tensor | None) -> torch.Tensor:
        b, seq, _ = x_BLH.shape
        q_BNLD = self.q_proj(x_BLH).view(b, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGLD = self.k_proj(x_BLH).view(b, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGLD = self.v_proj(x_BLH).view(b, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BNLD, k_BGLD = apply_rope(q_BNLD, cos_BLD, sin_BLD), apply_rope(k_BGLD, cos_BLD, sin_BLD)
        out_BNLD = F.scaled_dot_product_attention(
            q_BNLD,
            k_BGLD,
            v_BGLD,
            attn_mask=mask_B1LL,
            is_causal=mask_B1LL is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out_BNLD.transpose(1, 2).reshape(b, seq, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MoEBlock | SwiGLU = (
            MoEBlock(cfg) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x_BLH, cos_BLD, sin_BLD, mask_B1LL) -> tuple[torch.Tensor, RouterOutput | None]:
        x_BLH = x_BLH + self.self_attn(self.input_layernorm(x_BLH), cos_BLD, sin_BLD, mask_B1LL)
        h_BLH = self.post_attention_layernorm(x_BLH)
        if isinstance(self.mlp, MoEBlock):
            y_BLH, router = self.mlp(h_BLH)
            return x_BLH + y_BLH, router
        return x_BLH + self.mlp(h_BLH), None


class Qwen2Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The loss is formed in fp32 from bf16 logits, and in float64 in a float64 model."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def chunked_cross_entropy(
    head: nn.Linear, h_TH: torch.Tensor, targets_T: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Mean cross-entropy of `head(h_TH)` against `targets_T` (IGNORE_INDEX skipped), `chunk_tokens`
    rows at a time (`_ChunkedCrossEntropy`): autograd keeps `h_TH` and one fp32 log-sum-exp per row,
    never a [T, V] tensor. The value and gradients of `F.cross_entropy(head(h_TH).float(), targets_T)`
    up to fp32 summation order."""
    if head.bias is not None:
        raise ValueError("chunked_cross_entropy needs an LM head without bias")
    total = _ChunkedCrossEntropy.apply(h_TH, head.weight, targets_T, chunk_tokens)
    return total / (targets_T != IGNORE_INDEX).sum()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows t of CE(h_t W^T, y_t), `chunk` rows at a time in forward and in backward.

    Forward keeps only each row's log-sum-exp; backward recomputes a chunk's logits, turns them into
    the gradient in place (softmax - one-hot, times the incoming gradient; zero for ignored rows) and
    multiplies out dh and dW. dW is summed over chunks in fp32 and cast once: summing bf16 chunk
    gradients in bf16 (as autograd would, e.g. under `torch.utils.checkpoint`) loses accuracy with
    every chunk. Peak (a bytes per model-dtype element, bf16): the fp32 dW sum (4 V H) plus the larger
    of a chunk's logits and their fp32 copy (C (a + 4) V) and a chunk's dW product with its gradient
    (a V H + a C V); in fp32 the chunk's logits alone (4 C V), dW being the returned gradient itself.
    """

    @staticmethod
    def forward(ctx: Any, h_TH: torch.Tensor, weight_VH: torch.Tensor, targets_T: torch.Tensor, chunk: int):
        acc = torch.promote_types(h_TH.dtype, torch.float32)
        valid_T = targets_T != IGNORE_INDEX
        safe_T = targets_T.masked_fill(~valid_T, 0)
        lse_T = torch.empty(h_TH.shape[0], dtype=acc, device=h_TH.device)
        total = torch.zeros((), dtype=acc, device=h_TH.device)
        for rows in _row_chunks(h_TH.shape[0], chunk):
            logits_CV = _chunk_logits(h_TH, weight_VH, rows, acc)
            picked_C = logits_CV.gather(1, safe_T[rows, None]).squeeze(1)
            max_C = logits_CV.amax(dim=1)
            lse_C = max_C + logits_CV.sub_(max_C[:, None]).exp_().sum(dim=1).log()
            lse_T[rows] = lse_C
            total += torch.where(valid_T[rows], lse_C - picked_C, 0.0).sum()
        ctx.save_for_backward(h_TH, weight_VH, safe_T, valid_T, lse_T)
        ctx.chunk = chunk
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor):
        h_TH, weight_VH, safe_T, valid_T, lse_T = ctx.saved_tensors
        acc = lse_T.dtype
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h_TH) if want_h else None
        grad_w = torch.zeros(weight_VH.shape, dtype=acc, device=weight_VH.device) if want_w else None
        for rows in _row_chunks(h_TH.shape[0], ctx.chunk):
            g_CV = _chunk_logits(h_TH, weight_VH, rows, acc)
            g_CV.sub_(lse_T[rows, None]).exp_()  # softmax
            g_CV[torch.arange(g_CV.shape[0], device=g_CV.device), safe_T[rows]] -= 1.0
            # ignored rows get exactly zero (grad_total is inf when every target is ignored)
            g_CV.mul_(torch.where(valid_T[rows], grad_total.to(acc), 0.0)[:, None])
            g_CV = g_CV.to(h_TH.dtype)
            if grad_h is not None:
                grad_h[rows] = g_CV @ weight_VH
            if grad_w is not None and grad_w.dtype == g_CV.dtype:
                grad_w.addmm_(g_CV.T, h_TH[rows])  # fp32 / float64 models: no V x H temporary
            elif grad_w is not None:
                grad_w += g_CV.T @ h_TH[rows]  # bf16: a V x H product per chunk, summed in fp32
        return grad_h, grad_w.to(weight_VH.dtype) if grad_w is not None else None, None, None


def _row_chunks(n: int, chunk: int) -> list[slice]:
    return [slice(start, start + chunk) for start in range(0, n, chunk)]


def _chunk_logits(h_TH: torch.Tensor, weight_VH: torch.Tensor, rows: slice, acc: torch.dtype) -> torch.Tensor:
    """One chunk's logits, rounded to the model dtype and then cast to `acc`, as `head(h).float()`
    would give them: forward and backward must see the same values."""
    return (h_TH[rows] @ weight_VH.T).to(acc)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """[B, L, V] in the model dtype; None when the loss was computed in chunks (`loss_chunk_tokens`)."""
    batch_size: int
    loss: torch.Tensor | None = None
    """ce_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss (when targets are given)."""
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    """Unscaled load-balancing loss pooled over MoE layers (transformers' `aux_loss`)."""
    z_loss: torch.Tensor | None = None
    routers: list[RouterOutput] = field(default_factory=list)
    """One entry per MoE layer, in layer order."""
    balance: list[BalanceStats] = field(default_factory=list)
    """Load-balancing statistics per MoE layer (padding excluded)."""


def attention_mask_4d(
    attention_mask_BL: torch.Tensor | None,
    document_ids_BL: torch.Tensor | None,
    seq_len: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean [B, 1, L, L] mask (True = attend), or None for plain causal attention.

    A query always sees itself, so rows of padding never become all-masked (NaN in SDPA).
    """
    if attention_mask_BL is None and document_ids_BL is None:
        return None
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask_BL is not None:
        allowed = allowed & attention_mask_BL.bool()[:, None, None, :]
    if document_ids_BL is not None:
        allowed = allowed & (document_ids_BL[:, None, :, None] == document_ids_BL[:, None, None, :])
    return allowed | torch.eye(seq_len, dtype=torch.bool, device=device)


class Qwen2MoEForCausalLM(nn.Module):
    """Dense Qwen2 when `cfg.num_experts == 0`, Qwen2-MoE otherwise."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.model = Qwen2Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.loss_chunk_tokens = 0
        """With targets: > 0 computes the loss that many tokens at a time and returns no logits
        (`chunked_cross_entropy`); 0 materialises the [B, L, V] logits."""

    def tie_weights(self) -> None:
        """Share the LM head with the embedding; call again after `to_empty()`, which unties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """transformers' init: N(0, initializer_range) for matrices, zeros for biases, ones for norms."""
        std = self.config.initializer_range
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    p.fill_(1.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=generator)
            if isinstance(module, TopKRouter):
                module.selection_bias.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits, router decisions and (with `targets`) the training loss.

        Args:
            input_ids: [B, L] token ids.
            attention_mask: [B, L], 1 for real tokens and 0 for padding; excluded from the balance loss.
            position_ids: [B, L] RoPE positions (default 0..L-1; packed data may restart them per document).
            document_ids: [B, L] restrict attention to tokens of the same document (packed sequences).
            targets: [B, L] next-token ids aligned with `input_ids`; -100 is ignored.
        """
        cfg = self.config
        b, seq = input_ids.shape
        x_BLH = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(b, seq)
        cos_BLD, sin_BLD = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x_BLH.dtype)
        mask_B1LL = attention_mask_4d(attention_mask, document_ids, seq, input_ids.device)

        routers: list[RouterOutput] = []
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x_BLH, router = checkpoint(layer, x_BLH, cos_BLD, sin_BLD, mask_B1LL, use_reentrant=False)
            else:
                x_BLH, router = layer(x_BLH, cos_BLD, sin_BLD, mask_B1LL)
            if router is not None:
                routers.append(router)
        h_BLH = self.model.norm(x_BLH)
        chunked = targets is not None and self.loss_chunk_tokens > 0
        logits_BLV = None if chunked else self.lm_head(h_BLH)

        out = ModelOutput(logits=logits_BLV, batch_size=b, routers=routers)
        mask_T = attention_mask.reshape(-1) if attention_mask is not None else None
        if routers:
            out.balance = [balance_stats(r, mask_T) for r in routers]
            out.aux_loss = load_balancing_loss(out.balance)
            out.z_loss = z_loss(routers, mask_T)
        if targets is not None:
            if logits_BLV is None:
                h_TH = h_BLH.reshape(-1, cfg.hidden_size)
                out.ce_loss = chunked_cross_entropy(
                    self.lm_head, h_TH, targets.reshape(-1), self.loss_chunk_tokens
                )
            else:
                out.ce_loss = F.cross_entropy(
                    _at_least_fp32(logits_BLV).reshape(-1, cfg.vocab_size),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                )
            out.loss = out.ce_loss
            if routers:
                assert out.aux_loss is not None and out.z_loss is not None
                out.loss = (
                    out.loss + cfg.router_aux_loss_coef * out.aux_loss + cfg.router_z_loss_coef * out.z_loss
                )
        return out

    def num_params(self) -> int:
        """Unique parameters of the built module (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())
