"""Strategies that preserve the dense function at init do so at fp32 precision (max |diff| <= 1e-5),
loaded both by transformers' Qwen2MoeForCausalLM and by our model (docs/upcycling.md)."""

import pytest
import torch

from moe.hf import CheckpointReader
from tests.upcycle.fixtures import (
    EXACT_CASES,
    dense_logits,
    input_ids,
    logits_hf,
    logits_ours,
    make_dense,
    tensors,
)
from upcycle import MoEShape, UpcycleConfig, upcycle

TOL = dict(rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_strategies_compute_the_dense_function(case, tmp_path):
    shape, recipe = EXACT_CASES[case]
    dense = make_dense(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", MoEShape(**shape), UpcycleConfig(progress=False, **recipe))
    ids = input_ids()
    want = dense_logits(dense, ids)
    assert want.abs().max() > 1.0  # logits are O(1): 1e-5 is a tight tolerance
    torch.testing.assert_close(logits_hf(tmp_path / "moe", ids), want, **TOL)
    torch.testing.assert_close(logits_ours(tmp_path / "moe", ids), want, **TOL)


def test_the_exactness_tests_can_fail(tmp_path):
    """A model close to the dense one still fails the 1e-5 tolerance: granular with the paper's scaling
    and renormalised top-k is the dense function up to silu's non-homogeneity only (each neuron off by
    sigmoid(c z) / sigmoid(z), c = G^(1/3); test_granular.py), a ~15% relative error on the FFN here."""
    shape, recipe = EXACT_CASES["granular_exact"]
    dense = make_dense(tmp_path / "dense")
    upcycle(
        tmp_path / "dense",
        tmp_path / "moe",
        MoEShape(**shape),
        UpcycleConfig(progress=False, strategy="granular"),
    )
    ids = input_ids()
    assert (logits_hf(tmp_path / "moe", ids) - dense_logits(dense, ids)).abs().max() > 1e-2


def test_non_mlp_tensors_are_copied_bit_for_bit(tmp_path):
    make_dense(tmp_path / "dense", dtype=torch.bfloat16, tie_word_embeddings=True)
    upcycle(
        tmp_path / "dense",
        tmp_path / "moe",
        MoEShape(num_experts=2, num_experts_per_tok=1),
        UpcycleConfig(strategy="copy", progress=False),
    )
    src, out = CheckpointReader(tmp_path / "dense"), CheckpointReader(tmp_path / "moe")
    copied = [k for k in src.key_to_file if ".mlp." not in k]
    assert "lm_head.weight" not in out  # tied: not written, as transformers does
    for key in copied:
        a, b = src.get(key), out.get(key)
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), key
    for e in range(2):  # copy experts are the dense FFN, bit for bit
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(
                out.get(f"model.layers.1.mlp.experts.{e}.{proj}.weight"),
                src.get(f"model.layers.1.mlp.{proj}.weight"),
            )


def test_granular_layout_and_router_groups(tmp_path):
    """Expert e is copy e // G of shard e mod G; router rows are equal within each virtual group."""
    make_dense(tmp_path / "dense")
    shape = MoEShape(
        num_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,
    )
    upcycle(
        tmp_path / "dense",
        tmp_path / "moe",
        shape,
        UpcycleConfig(strategy="granular", granular_exact=True, progress=False),
    )
    src, out = tensors(tmp_path / "dense"), tensors(tmp_path / "moe")
    g = 4
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        router = out[p + "gate.weight"]
        for e in range(8):
            shard = slice(24 * (e % g), 24 * (e % g + 1))
            torch.testing.assert_close(
                out[f"{p}experts.{e}.gate_proj.weight"], src[p + "gate_proj.weight"][shard], rtol=0, atol=0
            )
            torch.testing.assert_close(
                out[f"{p}experts.{e}.down_proj.weight"],
                g * src[p + "down_proj.weight"][:, shard],
                rtol=0,
                atol=0,
            )
            assert torch.equal(router[e], router[(e // g) * g])
        assert not torch.equal(router[0], router[g])
