"""Tiny random dense transformers Qwen2 checkpoints to upcycle, and helpers to read the results."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeForCausalLM

from moe.hf import CheckpointReader, from_pretrained

VOCAB = 96
HIDDEN = 64
FFN = 96
# Distinct statistics per matrix, so that "re-drawn from the matrix's mean and std" is checkable.
MLP_STATS = {"gate_proj": (0.02, 0.05), "up_proj": (-0.03, 0.08), "down_proj": (0.01, 0.06)}


def make_dense(
    directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Qwen2ForCausalLM:
    """Save a random Qwen2ForCausalLM into `directory` and return it (fp32, eval mode).

    Every tensor is random, biases and norms included, so that copying is really tested; weights
    have std 0.05 so the logits are O(1) and a wrong expert shows far above the 1e-5 tolerance.
    """
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    g = torch.Generator().manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**(cfg | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif ".mlp." in name:
                mean, std = MLP_STATS[name.split(".")[-2]]
                p.copy_(mean + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    model.to(dtype).save_pretrained(directory)
    return model.float()


def input_ids(batch: int = 2, seq: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_hf(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # zero-width shared experts (strategies without one) warn at init
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        model, info = Qwen2MoeForCausalLM.from_pretrained(
            directory, dtype=torch.float32, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(ids).logits


def logits_ours(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = from_pretrained(directory, expert_backend="torch").eval()
    with torch.no_grad():
        return model(ids).logits


def dense_logits(model: Qwen2ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def tensors(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint whose key starts with `prefix`."""
    reader = CheckpointReader(directory)
    return {k: reader.get(k).float() for k in reader.key_to_file if k.startswith(prefix)}


def experts(
    directory: Path, layer: int, num_experts: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(gate [m, H], up [m, H], down [H, m]) of every routed expert of `layer`, in fp32."""
    reader = CheckpointReader(directory)
    p = f"model.layers.{layer}.mlp.experts."
    return [
        tuple(reader.get(f"{p}{e}.{proj}.weight").float() for proj in ("gate_proj", "up_proj", "down_proj"))
        for e in range(num_experts)
    ]


def report(directory: Path) -> dict:
    return json.loads((Path(directory) / "upcycle_report.json").read_text())


# (MoE shape, upcycle config) of the strategies that preserve the dense function exactly at init
EXACT_CASES = {
    # sparse upcycling: 4 copies of the FFN, top-2 renormalised (shared size / norm_topk_prob forced)
    "copy": (dict(num_experts=4, num_experts_per_tok=2), dict(strategy="copy")),
    # virtual groups, no shared expert: G = 96 / 24 = 4 shards x 2 copies, top-4
    "granular_exact": (
        dict(
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=0,
            norm_topk_prob=True,
        ),
        dict(strategy="granular", granular_exact=True),
    ),
    # shared expert from dense neurons [0, 32), the other 64 in G = 3 shards of 24 (8 padding neurons),
    # 4 copies each, top-6 = two whole virtual groups
    "granular_exact_shared_padded_top2g": (
        dict(
            num_experts=12,
            num_experts_per_tok=6,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            norm_topk_prob=True,
        ),
        dict(strategy="granular", granular_exact=True),
    ),
    # only layer 1 is MoE (decoder_sparse_step=2): layer 0 keeps its dense FFN, copied
    "copy_sparse_step": (
        dict(num_experts=3, num_experts_per_tok=1, decoder_sparse_step=2),
        dict(strategy="copy"),
    ),
}
