"""Granular upcycling's weight scaling against Megatron's rule (He et al. 2024, 2410.07524).

Megatron-LM (`megatron/core/transformer/moe/upcycling_utils.py`, `_get_moe_activation_scale`) scales
the routed output by a = E G^2 / K when the router takes the softmax before top-k (Qwen2-MoE's
norm_topk_prob=false) and by a = G when it takes top-k first and normalises over the K (our
norm_topk_prob=true); with a gated linear unit it multiplies each of fc1 (gate and up) and fc2
(down) by a^(1/3). `megatron_weight_scale` restates that rule here, apart from the code under test.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2MoeForCausalLM

from tests.upcycle.fixtures import HIDDEN, experts, make_dense, report, tensors
from upcycle import MoEShape, UpcycleConfig, upcycle


def megatron_weight_scale(pre_softmax: bool, expansion_rate: int, granularity: int, topk: int) -> float:
    activation_scale = expansion_rate * granularity**2 / topk if pre_softmax else granularity
    return activation_scale ** (1 / 3)  # gated linear unit: a cube root on each of gate, up and down


# G = 96 / 24 = 4 shards, E = 2 copies, top-4: one whole virtual group (the example)
E2G4K4 = dict(
    num_experts=8, num_experts_per_tok=4, moe_intermediate_size=24, shared_expert_intermediate_size=0
)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_weight_scale_is_megatrons(norm_topk_prob, tmp_path):
    make_dense(tmp_path / "dense")
    shape = MoEShape(**E2G4K4, norm_topk_prob=norm_topk_prob)
    upcycle(tmp_path / "dense", tmp_path / "moe", shape, UpcycleConfig(strategy="granular", progress=False))
    want = megatron_weight_scale(pre_softmax=not norm_topk_prob, expansion_rate=2, granularity=4, topk=4)
    assert want == pytest.approx(2.0 if not norm_topk_prob else 4 ** (1 / 3))
    assert report(tmp_path / "moe")["plan"]["strategy_plan"]["routed_weight_scale"] == pytest.approx(want)
    src = tensors(tmp_path / "dense")
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        for e, (gate, up, down) in enumerate(experts(tmp_path / "moe", layer, 8)):
            shard = slice(24 * (e % 4), 24 * (e % 4 + 1))
            torch.testing.assert_close(gate, want * src[p + "gate_proj.weight"][shard])
            torch.testing.assert_close(up, want * src[p + "up_proj.weight"][shard])
            torch.testing.assert_close(down, want * src[p + "down_proj.weight"][:, shard])


@pytest.mark.parametrize("copies, top_k", [(2, 4), (3, 8)])  # one or two whole virtual groups of G = 4
def test_renormalised_routed_output_has_the_dense_ffn_magnitude(copies, top_k, tmp_path):
    """With norm_topk_prob and whole groups selected, the K weights sum to 1 over G shards each scaled
    by c^3 = G, c = G^(1/3) per matrix, so the routed output is (c^2 / G) W_d (silu(c W_g x) * W_u x)
    = W_d (silu(c W_g x) * W_u x) / c: the dense FFN but for silu(c z) / (c silu(z)) = sigmoid(c z) /
    sigmoid(z) on each neuron (z its gate pre-activation). With the
    gate pre-activations of this model (std ~0.4) that keeps the output's norm within 10% of the FFN's;
    the old (E G^2 / K)^(1/3) scaling gave 2x at E 2, G 4, top-4."""
    make_dense(tmp_path / "dense")
    shape = MoEShape(
        **(E2G4K4 | dict(num_experts=4 * copies, num_experts_per_tok=top_k)), norm_topk_prob=True
    )
    upcycle(tmp_path / "dense", tmp_path / "moe", shape, UpcycleConfig(strategy="granular", progress=False))
    moe = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    src = tensors(tmp_path / "dense")
    x = torch.randn(1, 64, HIDDEN, generator=torch.Generator().manual_seed(0))
    c = 4 ** (1 / 3)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        w_g, w_u, w_d = (src[p + f"{k}_proj.weight"] for k in ("gate", "up", "down"))
        with torch.no_grad():
            y = moe.model.layers[layer].mlp(x)
        ffn = F.linear(F.silu(F.linear(x, w_g)) * F.linear(x, w_u), w_d)
        ffn_c = F.linear(F.silu(c * F.linear(x, w_g)) * F.linear(x, w_u), w_d) / c
        torch.testing.assert_close(y, ffn_c, rtol=0, atol=1e-5)  # the stated approximation, exactly
        ratio = (y.norm() / ffn.norm()).item()

        assert abs(ratio - 1) < 0.1, ratio
        assert (y - ffn).norm() / ffn.norm() > 1e-3  # not the dense function: silu is not homogeneous
