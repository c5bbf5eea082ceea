"""Throughput, model FLOPs utilisation and expert-load statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moe.config import ModelConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring; override with logging.peak_tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x activated matmul parameters + attention scores (PaLM appendix B).

    Activated parameters exclude the embedding lookup but include the LM head's matmul.
    """
    n = cfg.num_params()
    matmul_params = n["activated_non_embedding"] + cfg.vocab_size * cfg.hidden_size
    attention = (
        12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    )  # fwd+bwd of QK^T and AV, causal not halved
    return 6 * matmul_params + attention


def load_fractions(counts_LE: torch.Tensor) -> torch.Tensor:
    """Fraction of each MoE layer's assignments that went to each expert [L, E]."""
    return counts_LE / counts_LE.sum(-1, keepdim=True).clamp(min=1)


def expert_load(counts_LE: torch.Tensor, layer_ids: Sequence[int] = ()) -> dict[str, float]:
    """Metrics of per-layer expert assignment counts [L, E] (keys under the `moe/` prefix).

    `load_max_over_mean` (the busiest expert's load over the mean load, worst layer), `load_entropy`
    (mean over layers, nats) and `load_entropy_max` (log E, a uniform load); with `layer_ids` (the
    model's index of each of the L layers) also `layerNN_max_over_mean` and `layerNN_entropy`.
    """
    frac_LE = load_fractions(counts_LE)
    max_over_mean_L = frac_LE.max(-1).values * counts_LE.shape[-1]
    entropy_L = -(frac_LE * frac_LE.clamp(min=1e-12).log()).sum(-1)
    metrics = {
        "load_max_over_mean": max_over_mean_L.max().item(),
        "load_entropy": entropy_L.mean().item(),
        "load_entropy_max": math.log(counts_LE.shape[-1]),
    }
    for layer, idx in enumerate(layer_ids):
        metrics[f"layer{idx:02d}_max_over_mean"] = float(max_over_mean_L[layer])
        metrics[f"layer{idx:02d}_entropy"] = float(entropy_L[layer])
    return metrics
