"""Tiny random transformers Qwen2 / Qwen2-MoE models for parity tests."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

VOCAB = 96

CASES = {
    "dense_gqa": dict(moe=False, num_key_value_heads=2),
    "dense_tied": dict(moe=False, num_key_value_heads=4, tie_word_embeddings=True),
    "moe_shared": dict(moe=True, shared_expert_intermediate_size=48, norm_topk_prob=False),
    "moe_no_shared": dict(moe=True, shared_expert_intermediate_size=0, norm_topk_prob=False),
    "moe_norm_topk": dict(moe=True, shared_expert_intermediate_size=48, norm_topk_prob=True),
    "moe_mixed_layers": dict(
        moe=True,
        shared_expert_intermediate_size=40,
        mlp_only_layers=[0],
        decoder_sparse_step=1,
        num_hidden_layers=4,
        num_key_value_heads=1,
    ),
    "moe_sparse_step": dict(
        moe=True, shared_expert_intermediate_size=40, decoder_sparse_step=2, num_hidden_layers=4
    ),
}


def make_hf_model(case: str, seed: int = 0):
    kw = dict(CASES[case])
    moe = kw.pop("moe")
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=3e-5,  # not the default: a reader that ignored eps would fail
    )
    common |= kw
    torch.manual_seed(seed)
    if moe:
        moe_kw = dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, output_router_logits=True
        )
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**(moe_kw | common)))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # make biases, norms and routers non-trivial so that copying is really tested
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif "mlp.gate.weight" in name or "shared_expert_gate" in name:
                p.normal_(0, 0.5)
    return model.eval()


def write_public_layout(model, directory) -> None:
    """Per-expert safetensors written by hand, as in the public Qwen1.5-MoE-A2.7B checkpoint."""
    tensors = {}
    for key, t in model.state_dict().items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = key.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                tensors[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("down_proj")
            for e in range(t.shape[0]):
                tensors[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        elif key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        else:
            tensors[key] = t.clone()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
