"""The torch expert backend against the for-loop reference, and degenerate equivalences."""

import pytest
import torch
import torch.nn.functional as F

from moe.config import ExpertBackend, ModelConfig
from moe.dispatch import permute, unpermute
from moe.experts import RoutedExperts, check_grouped_mm_alignment, resolve_backend
from moe.layer import MoEBlock, SwiGLU
from tests.moe.reference import loop_experts


def _experts(num_experts=6, hidden=16, inter=8, seed=0):
    torch.manual_seed(seed)
    ex = RoutedExperts(num_experts, hidden, inter, "torch")
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.3)
        ex.down_proj.normal_(0, 0.3)
    return ex


@pytest.mark.parametrize("backward", ["sum", "random"])
def test_torch_backend_matches_loop_reference(backward):
    ex = _experts()
    x = torch.randn(37, 16, requires_grad=True)
    experts_TK = torch.stack([torch.randperm(6)[:3] for _ in range(37)])
    experts_TK[:, 0] = torch.where(experts_TK[:, 0] == 5, 0, experts_TK[:, 0])  # skew: expert 5 rarer
    weights_TK = torch.rand(37, 3, requires_grad=True)

    y = ex(x, experts_TK, weights_TK)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weights_TK.detach().clone().requires_grad_()
    gu = ex.gate_up_proj.detach().clone().requires_grad_()
    dn = ex.down_proj.detach().clone().requires_grad_()
    y_ref = loop_experts(x_ref, experts_TK, w_ref, gu, dn)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)

    # `.sum()` sends an expanded gradient, which grouped_mm's backward rejects unless made contiguous.
    g = None if backward == "sum" else torch.randn_like(y)
    (y.sum() if g is None else (y * g).sum()).backward()
    (y_ref.sum() if g is None else (y_ref * g).sum()).backward()
    for got, want in [
        (x.grad, x_ref.grad),
        (weights_TK.grad, w_ref.grad),
        (ex.gate_up_proj.grad, gu.grad),
        (ex.down_proj.grad, dn.grad),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expert_without_tokens_gets_zero_gradient():
    ex = _experts(num_experts=4)
    x = torch.randn(10, 16)
    experts_TK = torch.randint(0, 3, (10, 1))  # expert 3 never chosen
    ex(x, experts_TK, torch.ones(10, 1)).square().sum().backward()
    assert ex.gate_up_proj.grad[3].abs().max() == 0 and ex.down_proj.grad[3].abs().max() == 0
    assert ex.gate_up_proj.grad[:3].abs().sum() > 0


def test_permute_unpermute_roundtrip():
    x = torch.randn(9, 4)
    experts_TK = torch.randint(0, 5, (9, 2))
    x_SH, plan = permute(x, experts_TK, 5)
    assert torch.equal(plan.counts_E, torch.bincount(experts_TK.reshape(-1), minlength=5))
    sorted_ids = experts_TK.reshape(-1)[plan.order_S]
    assert torch.equal(sorted_ids, sorted_ids.sort().values)
    torch.testing.assert_close(unpermute(x_SH, torch.full((9, 2), 0.5), plan), x)


def test_one_expert_top1_equals_dense_mlp():
    cfg = ModelConfig(
        hidden_size=16,
        num_experts=1,
        num_experts_per_tok=1,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=0,
        num_attention_heads=2,
        num_key_value_heads=1,
        expert_backend="torch",
    )
    block = MoEBlock(cfg)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        block.gate.weight.normal_()
        block.experts.gate_up_proj.copy_(torch.cat([dense.gate_proj.weight, dense.up_proj.weight])[None])
        block.experts.down_proj.copy_(dense.down_proj.weight[None])
    x = torch.randn(2, 5, 16)
    y, router = block(x)
    assert torch.equal(router.weights_TK, torch.ones(10, 1))  # softmax over one expert
    torch.testing.assert_close(y, dense(x), rtol=1e-6, atol=1e-6)


def test_block_matches_float64_formula():
    """y = sum_k p_k E_k(x) + sigmoid(x w_sg) S(x), routing from a float64 softmax."""
    cfg = ModelConfig(
        hidden_size=16,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        norm_topk_prob=True,
        num_attention_heads=2,
        num_key_value_heads=1,
        expert_backend="torch",
    )
    block = MoEBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    x = torch.randn(3, 7, 16)
    got = block(x)[0].reshape(-1, 16)
    block, x_TH = block.double(), x.reshape(-1, 16).double()
    probs = (x_TH @ block.gate.weight.T).softmax(-1)
    w, idx = probs.topk(3, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    want = loop_experts(x_TH, idx, w, block.experts.gate_up_proj, block.experts.down_proj)
    s = block.shared_expert
    want = want + torch.sigmoid(x_TH @ block.shared_expert_gate.weight.T) * (
        (F.silu(x_TH @ s.gate_proj.weight.T) * (x_TH @ s.up_proj.weight.T)) @ s.down_proj.weight.T
    )
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_backend_resolution_errors():
    if not torch.cuda.is_available():
        assert resolve_backend("auto") is ExpertBackend.torch
    with pytest.raises(ValueError, match="expert_backend='triton' is unknown"):
        resolve_backend("triton")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="megablocks needs CUDA"):
            resolve_backend("megablocks")


def test_auto_is_torch_for_non_bf16_weights(monkeypatch):
    """grouped_gemm is bf16-only: `auto` picks megablocks only for bf16 experts, even where it works."""
    monkeypatch.setattr("moe.experts.megablocks_available", lambda: True)
    assert resolve_backend("auto", torch.bfloat16) is ExpertBackend.megablocks
    assert resolve_backend("auto", torch.float32) is ExpertBackend.torch
    assert resolve_backend("auto", torch.float16) is ExpertBackend.torch


@pytest.mark.parametrize(
    ("hidden", "inter", "dtype", "bad"),
    [
        (58, 8, torch.float32, "hidden_size=58 must be a multiple of 4"),
        (16, 12, torch.bfloat16, "moe_intermediate_size=12 must be a multiple of 8"),
    ],
)
def test_misaligned_widths_are_refused_with_the_rule(hidden, inter, dtype, bad):
    """Unchecked, grouped_mm dies with "strides should be multiple of 16 bytes" (CPU and CUDA)."""
    ex = RoutedExperts(4, hidden, inter, "torch").to(dtype)
    x = torch.randn(5, hidden, dtype=dtype)
    with pytest.raises(ValueError, match=bad):
        ex(x, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1))
    with pytest.raises(ValueError, match="16-byte-aligned"):
        check_grouped_mm_alignment(hidden, inter, dtype)
    check_grouped_mm_alignment(16, 8, dtype)  # aligned: no error


def test_empty_input_still_depends_on_the_rows():
    """An expert-parallel rank that receives no row: autograd must reach the (empty) input, or that
    rank never joins the all-to-all's backward that its peers wait in."""
    ex = _experts()
    x = torch.zeros(0, 16, requires_grad=True)
    y = ex.ops.grouped_swiglu(x, torch.zeros(6, dtype=torch.long), ex.gate_up_proj, ex.down_proj)
    assert y.shape == (0, 16) and y.grad_fn is not None
    reached = []
    x.register_hook(lambda g: reached.append(g.shape))
    y.sum().backward()
    assert reached == [torch.Size([0, 16])]
    assert ex.gate_up_proj.grad is not None and ex.gate_up_proj.grad.abs().max() == 0


def test_selection_bias_stays_fp32_under_bf16():
    """bf16 would round 0.5 + 1e-3 back to 0.5: the aux-loss-free bias updates would vanish."""
    block = MoEBlock(
        ModelConfig(
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            intermediate_size=32,
        )
    ).to(torch.bfloat16)
    assert block.gate.weight.dtype == torch.bfloat16
    assert block.gate.selection_bias.dtype == torch.float32
