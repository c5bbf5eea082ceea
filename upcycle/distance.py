"""How far the upcycled model starts from the dense one, measured while the checkpoint streams out.

Shape legend: B sequences, L tokens per sequence, T = B*L tokens (2T: both streams stacked), H hidden,
N routed experts, K experts per token, C a chunk of tokens, V vocabulary.

Design choices:
- Two residual streams go through the decoder together, layer by layer: the dense model's
  (the source's weights) and the MoE model's (the tensors as written, in the output dtype). In each
  MoE layer the MoE block is also applied to the dense stream's own FFN input h, so
  `ffn_relative_error` = |MoE(h) - FFN(h)| / |FFN(h)| compares the two FFNs on the same hidden
  states, and the router statistics are those of h. The final logits of the two streams give the
  KL divergence and the cross-entropy change of the whole model.
- `InitDistance.add` consumes the output tensors in file order, as the shard writer does, and keeps
  only what the current layer still needs (its attention weights and one expert at a time); the
  source is read a layer at a time. The LM head, a copied tensor, is read from the source in row
  chunks at the end (`result`) and cast to the output dtype, which is what the run writes. No
  model is ever assembled, so the whole-model numbers cost little memory at any size and are
  always measured.
- Both streams go through an MoE layer stacked as one batch of 2T rows (`_Routed`), so each stored
  weight is upcast once and no fp32 copy outlives its product.
- Every product is computed in fp32 from the stored tensors (bf16 weights are upcast), with the
  router in fp32 as transformers computes it for fp32 models: an exact strategy reads ~1e-7.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from moe.hf import CheckpointReader
from moe.model import Attention, rope_cos_sin
from upcycle.plan import UpcyclePlan

_VOCAB_CHUNK_ROWS = 8192  # LM-head rows upcast to fp32 at a time
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_ATTENTION = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
)
_PROJ = ("gate_proj", "up_proj", "down_proj")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _swiglu(x_CH: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_CH, gate.float())) * F.linear(x_CH, up.float()), down.float())


class _Routed:
    """An MoE layer applied to both streams' FFN inputs at once: x_2TH = [dense stream; MoE stream].

    One row per token is independent of the others (routing, experts), so the two streams share
    every matrix product and each stored weight is upcast once.
    """

    def __init__(self, x_2TH: torch.Tensor, router_NH: torch.Tensor, top_k: int, norm_topk_prob: bool):
        self.x_2TH = x_2TH
        self.probs_2TN = F.linear(x_2TH, router_NH.float()).softmax(dim=-1)
        self.weights_2TK, self.experts_2TK = torch.topk(self.probs_2TN, top_k, dim=-1)
        if norm_topk_prob:
            self.weights_2TK = self.weights_2TK / self.weights_2TK.sum(dim=-1, keepdim=True)
        self.y_2TH = torch.zeros_like(x_2TH)

    def add_expert(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        tok, slot = (self.experts_2TK == e).nonzero(as_tuple=True)
        if tok.numel():
            w_C1 = self.weights_2TK[tok, slot][:, None]
            self.y_2TH.index_add_(0, tok, w_C1 * _swiglu(self.x_2TH[tok], gate, up, down))

    def add_shared(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, shared_gate_1H: torch.Tensor
    ) -> None:
        g_2T1 = torch.sigmoid(F.linear(self.x_2TH, shared_gate_1H.float()))
        self.y_2TH += g_2T1 * _swiglu(self.x_2TH, gate, up, down)


class InitDistance:
    """Feed it every (key, tensor) of the upcycled checkpoint in file order, then call `result()`.

    Args:
        plan: the run's plan (source directory, dense and MoE configs).
        ids_BL: the calibration tokens.
    """

    def __init__(self, plan: UpcyclePlan, ids_BL: torch.Tensor):
        self.plan, self.moe, self.ids_BL = plan, plan.moe, ids_BL
        b, seq = ids_BL.shape
        pos_BL = torch.arange(seq).expand(b, seq)
        self.cos_BLD, self.sin_BLD = rope_cos_sin(
            pos_BL, self.moe.head_dim, self.moe.rope_theta, torch.float32
        )
        with torch.device("meta"):  # its weights are assigned layer by layer
            self.attention = Attention(self.moe)
        self.h_dense = self.h_moe = torch.empty(0)
        self.layer = -1
        self.layers: list[dict[str, Any]] = []
        self.final_norm = torch.empty(0)
        self._reset_layer()

    # ---- the stream ------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key == "model.embed_tokens.weight":
            self.h_moe = F.embedding(self.ids_BL, tensor).float()
            self.h_dense = self._source_rows(key, self.ids_BL).float()
        elif key.startswith("model.layers."):
            _, _, index, name = key.split(".", 3)
            if int(index) != self.layer:
                self._finish_layer()
                self.layer = int(index)
            self._add_layer_tensor(name, tensor)
        else:
            self._finish_layer()
            if key == "model.norm.weight":  # a copy: a view would keep the whole source file mapped
                self.final_norm = tensor.to(torch.float32, copy=True)

    def _reset_layer(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.expert: dict[str, torch.Tensor] = {}
        self.routed: _Routed | None = None
        self.ffn_dense: torch.Tensor | None = None
        self.x_moe: torch.Tensor | None = None

    def _add_layer_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if not name.startswith("mlp."):
            self.weights[name] = tensor
            return
        if self.ffn_dense is None:  # the first MLP tensor: attention and norms have all arrived
            self._attention()
        expert = _EXPERT.fullmatch(name)
        if name == "mlp.gate.weight":
            assert self.x_moe is not None
            x_2TH = torch.cat([self.x_dense, self.x_moe]).reshape(-1, self.moe.hidden_size)
            self.routed = _Routed(x_2TH, tensor, self.moe.num_experts_per_tok, self.moe.norm_topk_prob)
        elif expert:
            self.expert[expert.group(2)] = tensor
            if len(self.expert) == 3:
                assert self.routed is not None
                self.routed.add_expert(int(expert.group(1)), *(self.expert[p] for p in _PROJ))
                self.expert = {}
        else:  # the shared expert and its gate, or a dense layer's MLP
            self.weights[name] = tensor

    def _attention(self) -> None:
        """Attention of both streams; the dense FFN of the dense stream (from the source)."""
        reader = CheckpointReader(self.plan.source)  # a fresh reader: the previous layer's pages go
        p = f"model.layers.{self.layer}."
        self.h_dense, self.x_dense = self._attention_block(
            self.h_dense, {n: reader.get(p + n).float() for n in _ATTENTION}
        )
        self.h_moe, self.x_moe = self._attention_block(
            self.h_moe, {n: self.weights.pop(n).float() for n in _ATTENTION}
        )
        ffn = [reader.get(f"{p}mlp.{proj}.weight") for proj in _PROJ]
        self.ffn_dense = _swiglu(self.x_dense, *ffn)

    def _attention_block(self, h_BLH: torch.Tensor, w: dict[str, torch.Tensor]):
        """(h + attention, the FFN input) of one layer."""
        eps = self.moe.rms_norm_eps
        state = {k.removeprefix("self_attn."): v for k, v in w.items() if k.startswith("self_attn.")}
        self.attention.load_state_dict(state, assign=True)
        with torch.no_grad():
            a = self.attention(
                _rms_norm(h_BLH, w["input_layernorm.weight"], eps), self.cos_BLD, self.sin_BLD, None
            )
        h_BLH = h_BLH + a
        return h_BLH, _rms_norm(h_BLH, w["post_attention_layernorm.weight"], eps)

    def _finish_layer(self) -> None:
        if self.layer < 0 or self.ffn_dense is None:
            return
        assert self.x_moe is not None
        ffn_BLH = self.ffn_dense
        if self.routed is None:  # a layer that stays dense
            y_moe = _swiglu(self.x_moe, *(self.weights[f"mlp.{p}.weight"] for p in _PROJ))
        else:
            gate, up, down = (self.weights[f"mlp.shared_expert.{p}.weight"] for p in _PROJ)
            self.routed.add_shared(gate, up, down, self.weights["mlp.shared_expert_gate.weight"])
            t = self.h_dense.shape[0] * self.h_dense.shape[1]
            self.layers.append(self._layer_stats(self.routed, t, ffn_BLH))
            y_moe = self.routed.y_2TH[t:].view_as(self.h_moe)
        self.h_dense = self.h_dense + ffn_BLH
        self.h_moe = self.h_moe + y_moe
        self._reset_layer()
        self.layer = -1

    def _layer_stats(self, routed: _Routed, t: int, ffn_BLH: torch.Tensor) -> dict[str, Any]:
        """The dense stream's numbers: the first `t` rows of `routed`."""
        n, k = self.moe.num_experts, self.moe.num_experts_per_tok
        ffn_TH = ffn_BLH.reshape(t, -1).double()
        error = (routed.y_2TH[:t].double() - ffn_TH).norm() / ffn_TH.norm().clamp_min(1e-30)
        p = routed.probs_2TN[:t].double()
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
        load_N = torch.bincount(routed.experts_2TK[:t].flatten(), minlength=n)
        return {
            "layer": self.layer,
            "ffn_relative_error": float(error),
            "router_entropy": float(entropy),
            "max_load_ratio": float(load_N.max()) / (t * k / n),
            "dead_experts": float((load_N == 0).double().mean()),
        }

    # ---- the whole model ---------------------------------------------------------------------------
    @torch.no_grad()
    def result(self) -> dict[str, Any]:
        """Per-layer statistics and the whole-model KL / cross-entropy (call after the last tensor)."""
        self._finish_layer()
        moe = self.moe
        # The LM head (or the tied embedding) is copied unchanged, cast to the output dtype: the same
        # rows serve both models, read from the source in chunks (one mapping, never the whole matrix).
        head_key = "model.embed_tokens.weight" if moe.tie_word_embeddings else "lm_head.weight"
        norm = CheckpointReader(self.plan.source).get("model.norm.weight")
        kl, ce_dense, ce_moe = _compare_logits(
            _rms_norm(self.h_dense, norm, moe.rms_norm_eps).flatten(0, 1),
            _rms_norm(self.h_moe, self.final_norm, moe.rms_norm_eps).flatten(0, 1),
            lambda a, b: self._source_rows(head_key, torch.arange(a, b)),
            self.plan.dtype,
            moe.vocab_size,
            self.ids_BL,
        )
        errors = [layer["ffn_relative_error"] for layer in self.layers]
        return {
            "layers": self.layers,
            "mean_ffn_relative_error": sum(errors) / len(errors),
            "max_router_entropy": math.log(moe.num_experts),
            "kl": kl,
            "ce_dense": ce_dense,
            "ce_moe": ce_moe,
            "ce_delta": ce_moe - ce_dense,
        }

    def _source_rows(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows of a source matrix, read without loading the rest (embedding lookups, LM-head chunks)."""
        path = CheckpointReader(self.plan.source).key_to_file[key]
        with safe_open(path, framework="pt") as f:
            matrix = f.get_slice(key)
            if rows.dim() == 1 and rows.numel() and bool((rows[1:] - rows[:-1] == 1).all()):
                return matrix[int(rows[0]) : int(rows[-1]) + 1]
            flat = rows.flatten()
            return torch.stack([matrix[int(i) : int(i) + 1][0] for i in flat]).view(*rows.shape, -1)


def _compare_logits(
    x_dense_TH: torch.Tensor,
    x_moe_TH: torch.Tensor,
    head_rows: Callable[[int, int], torch.Tensor],
    moe_dtype: torch.dtype,
    v: int,
    ids_BL: torch.Tensor,
) -> tuple[float, float, float]:
    """Mean KL(dense || moe) over all tokens, and each model's next-token cross-entropy (nats).

    One pass over the vocabulary in chunks of LM-head rows (`head_rows(a, b)`, in the source dtype;
    the MoE model's are those cast to `moe_dtype`), with online log-sum-exps: per token, M = the running max of the dense logits z, S0 = sum exp(z - M)
    and S1 = sum exp(z - M) (z - z'), so that KL = S1 / S0 - lse(z) + lse(z'). Memory: a few [T, chunk]
    blocks, whatever the vocabulary.
    """
    b, seq = ids_BL.shape
    t = b * seq
    targets_T = torch.cat([ids_BL[:, 1:], torch.full((b, 1), -1)], dim=1).flatten()
    neg_inf = torch.full((t,), -math.inf, dtype=torch.float64)
    max_d, max_m = neg_inf.clone(), neg_inf.clone()
    s0_d, s0_m, s1 = (torch.zeros(t, dtype=torch.float64) for _ in range(3))
    target_d, target_m = torch.zeros(t, dtype=torch.float64), torch.zeros(t, dtype=torch.float64)
    for row in range(0, v, _VOCAB_CHUNK_ROWS):
        end = min(row + _VOCAB_CHUNK_ROWS, v)
        w = head_rows(row, end)
        z_d = F.linear(x_dense_TH, w.float()).double()
        z_m = F.linear(x_moe_TH, w.to(moe_dtype).float()).double()
        new_d = torch.maximum(max_d, z_d.max(-1).values)
        new_m = torch.maximum(max_m, z_m.max(-1).values)
        rescale_d = torch.exp(max_d - new_d)
        e_d = torch.exp(z_d - new_d[:, None])
        s0_d = s0_d * rescale_d + e_d.sum(-1)
        s1 = s1 * rescale_d + (e_d * (z_d - z_m)).sum(-1)
        s0_m = s0_m * torch.exp(max_m - new_m) + torch.exp(z_m - new_m[:, None]).sum(-1)
        max_d, max_m = new_d, new_m
        here = (targets_T >= row) & (targets_T < end)
        idx = (targets_T[here] - row)[:, None]
        target_d[here] = z_d[here].gather(1, idx).squeeze(1)
        target_m[here] = z_m[here].gather(1, idx).squeeze(1)
    lse_d, lse_m = max_d + s0_d.log(), max_m + s0_m.log()
    kl_T = s1 / s0_d - lse_d + lse_m
    has_target = targets_T >= 0
    ce_d = (lse_d - target_d)[has_target].mean()
    ce_m = (lse_m - target_m)[has_target].mean()
    return float(kl_T.mean()), float(ce_d), float(ce_m)


def summary_line(distance: dict[str, Any]) -> str:
    """The one line the CLI prints at the end."""
    if "skipped" in distance:
        return f"init distance: skipped ({distance['skipped']})"
    calibration = distance["calibration"]
    errors = [layer["ffn_relative_error"] for layer in distance["layers"]]
    tokens = calibration["num_sequences"] * calibration["seq_len"]
    return (
        f"init distance on {tokens} tokens ({calibration['tokens'].replace('_', ' ')}): FFN relative error "
        f"{distance['mean_ffn_relative_error']:.4g} mean ({min(errors):.3g}-{max(errors):.3g} over "
        f"{len(errors)} MoE layers), KL {distance['kl']:.4g} nats, CE {distance['ce_dense']:.4f} -> "
        f"{distance['ce_moe']:.4f} ({distance['ce_delta']:+.4f})"
    )
