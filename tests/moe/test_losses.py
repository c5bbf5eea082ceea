"""Router losses against transformers' formula and a float64 computation."""

import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from moe.losses import BalanceStats, balance_stats, load_balancing_loss, z_loss
from moe.router import TopKRouter


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws from the same stream, whatever ran before it."""
    torch.manual_seed(1234)


def _routers(num_layers=3, tokens=40, experts=8, top_k=2, seed=0):
    torch.manual_seed(seed)
    outs = []
    for _ in range(num_layers):
        r = TopKRouter(16, experts, top_k, norm_topk_prob=False)
        torch.nn.init.normal_(r.weight)
        outs.append(r(torch.randn(tokens, 16)))
    return outs


def test_load_balancing_equals_transformers_pooled_formula():
    routers = _routers()
    mask = (torch.rand(40) > 0.3).long()
    for m in (None, mask):
        ours = load_balancing_loss([balance_stats(r, m) for r in routers])
        theirs = load_balancing_loss_func(
            tuple(r.logits_TE for r in routers), 8, 2, None if m is None else m.view(4, 10)
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_balanced_routing_gives_top_k():
    # every expert chosen equally often with uniform probabilities -> aux = K
    experts, top_k, tokens = 8, 2, 16
    probs = torch.full((tokens, experts), 1 / experts)
    counts = torch.full((experts,), tokens * top_k / experts)
    stats = BalanceStats(counts, probs.sum(0), torch.tensor(float(tokens)))
    torch.testing.assert_close(load_balancing_loss([stats]), torch.tensor(float(top_k)))


def test_global_counts_replace_local_ones():
    """Summing counts over micro-batches first == the loss of one big batch (for the count part)."""
    a, b = _routers(num_layers=1, seed=1)[0], _routers(num_layers=1, seed=2)[0]
    sa, sb = balance_stats(a), balance_stats(b)
    glob = sa + sb
    big = load_balancing_loss([glob])
    # the probability factor comes from the local micro-batch; its share of the big-batch loss:
    local = load_balancing_loss([sa], counts_E=glob.counts_E, count_rows=glob.rows)
    local_b = load_balancing_loss([sb], counts_E=glob.counts_E, count_rows=glob.rows)
    torch.testing.assert_close((local + local_b) / 2, big)


def test_z_loss_float64():
    routers = _routers()
    want = torch.cat([torch.logsumexp(r.logits_TE.double(), -1) ** 2 for r in routers]).mean()
    torch.testing.assert_close(z_loss(routers).double(), want, rtol=1e-6, atol=0)


def test_router_fp32_and_renormalisation():
    r = TopKRouter(16, 8, 3, norm_topk_prob=True).to(torch.bfloat16)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    out = r(x)
    assert out.logits_TE.dtype == torch.float32 and out.weights_TK.dtype == torch.float32
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(5))
    probs = (x.double() @ r.weight.double().T).softmax(-1)
    assert torch.equal(out.experts_TK.sort(-1).values, probs.topk(3, -1).indices.sort(-1).values)


def test_selection_bias_changes_choice_not_weights():
    r = TopKRouter(16, 4, 1, norm_topk_prob=False)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(50, 16)
    r.selection_bias[2] = 100.0  # logit units: beats N(0, 1) router weights for every seed
    r.use_selection_bias = True
    out = r(x)
    assert (out.experts_TK == 2).all()
    torch.testing.assert_close(out.weights_TK[:, 0], out.probs_TE[:, 2])
