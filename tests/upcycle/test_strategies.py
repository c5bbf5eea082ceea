"""Documented properties of the strategies that are not exact at init (docs/upcycling.md)."""

import math

import pytest
import torch

from moe.config import ModelConfig
from moe.hf import read_config
from tests.upcycle.fixtures import FFN, HIDDEN, MLP_STATS, experts, make_dense, report, tensors
from upcycle import MoEShape, UpcycleConfig, plan_config, upcycle
from upcycle.clustering import balanced_kmeans
from upcycle.strategies import get_strategy, seeded_generator

# 10 routed experts of 16 + a shared expert of 32 from a 96-wide FFN: r = ceil((160 + 32) / 96) = 2
FINE = MoEShape(
    num_experts=10, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32
)
# 6 routed experts of 16 partitioning the 96-wide FFN, top-2
SPLIT6 = MoEShape(
    num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=0
)


def _match(rows_MH: torch.Tensor, dense_FH: torch.Tensor) -> torch.Tensor:
    """Index of the dense row equal to each row, or -1 where none is."""
    eq_MF = (rows_MH[:, None, :] == dense_FH[None, :, :]).all(-1)
    return torch.where(eq_MF.any(1), eq_MF.int().argmax(1), -1)


def _neurons(gate, up, down_HM, dense):
    """Dense neuron of each slot, -1 where gate row, up row and down column are not all one dense neuron."""
    g = _match(gate, dense["gate"])
    u = _match(up, dense["up"])
    d = _match(down_HM.T, dense["down"].T)
    return torch.where((g == u) & (u == d), g, -1), (g >= 0) | (u >= 0) | (d >= 0)


def _dense_mlp(directory, layer):
    t = tensors(directory, f"model.layers.{layer}.mlp.")
    p = f"model.layers.{layer}.mlp."
    return {k: t[p + f"{k}_proj.weight"] for k in ("gate", "up", "down")}


def _shared(directory, layer):
    t = tensors(directory, f"model.layers.{layer}.mlp.shared_expert.")
    p = f"model.layers.{layer}.mlp.shared_expert."
    return tuple(t[p + f"{k}_proj.weight"] for k in ("gate", "up", "down"))


# as FINE, but 10 x 16 + 24 = 184 slots from r = 2 replicas (192 neurons): 8 leftovers dropped, as the
# A2.7B recipe drops 3456 per layer (17 replicas of 5504 for 60 x 1408 + 5632)
FINE_LEFTOVERS = MoEShape(
    num_experts=10, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24
)


@pytest.mark.parametrize("shape", [FINE, FINE_LEFTOVERS], ids=["even", "leftovers"])
def test_finegrained_without_reinit_is_made_of_dense_neurons(shape, tmp_path):
    """Every kept slot holds the dense neuron the plan names; no neuron more often than its replicas."""
    make_dense(tmp_path / "dense")
    cfg = UpcycleConfig(reinit_fraction=0.0, progress=False)
    upcycle(tmp_path / "dense", tmp_path / "moe", shape, cfg)
    slots = 10 * 16 + shape.shared_expert_intermediate_size
    r = math.ceil(slots / FFN)
    assert report(tmp_path / "moe")["plan"]["strategy_plan"]["replicas"] == r == 2
    dense_cfg, _ = read_config(tmp_path / "dense")
    moe_cfg, _ = plan_config(dense_cfg, shape, cfg)
    for layer in range(2):
        dense = _dense_mlp(tmp_path / "dense", layer)
        found = [_neurons(*ex, dense)[0] for ex in experts(tmp_path / "moe", layer, 10)]
        found.append(_neurons(*_shared(tmp_path / "moe", layer), dense)[0])
        idx = torch.cat(found)
        assert idx.numel() == slots and (idx >= 0).all(), "every slot is a neuron of the dense FFN"
        counts = torch.bincount(idx, minlength=FFN)
        assert counts.max() <= r
        assert (counts < r).sum() == r * FFN - slots  # the leftovers: dense neurons kept r - 1 times
        plan = get_strategy("finegrained").plan_layer(layer, moe_cfg, dense_cfg, cfg)
        assert torch.equal(counts, plan.neuron_counts(FFN))
        assert torch.equal(idx, torch.cat([plan.routed_NM.flatten(), plan.shared_S]))
        for i in range(r):  # each replica is a permutation of the dense neurons
            replica = torch.cat([plan.routed_NM.flatten(), plan.shared_S])[i * FFN : (i + 1) * FFN]
            assert replica.unique().numel() == replica.numel()


def test_finegrained_reinit_half_of_each_expert(tmp_path):
    make_dense(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", FINE, UpcycleConfig(reinit_fraction=0.5, progress=False))
    drawn = {"gate": [], "up": [], "down": []}
    for layer in range(2):
        dense = _dense_mlp(tmp_path / "dense", layer)
        slots = [*experts(tmp_path / "moe", layer, 10), _shared(tmp_path / "moe", layer)]
        for gate, up, down in slots:
            idx, any_match = _neurons(gate, up, down, dense)
            fresh = idx < 0
            assert fresh.sum() == gate.shape[0] // 2, "half of each expert's neurons are re-drawn"
            assert not any_match[fresh].any(), "a re-drawn neuron shares no row or column with the dense FFN"
            drawn["gate"].append(gate[fresh].flatten())
            drawn["up"].append(up[fresh].flatten())
            drawn["down"].append(down[:, fresh].flatten())
    for name, values in drawn.items():
        x = torch.cat(values)  # 2 layers x (10 x 8 + 16) neurons x 64 = 12288 draws
        mean, std = MLP_STATS[f"{name}_proj"]
        assert abs(x.mean() - mean) < 0.1 * std, name
        assert abs(x.std() / std - 1) < 0.05, name


def test_same_seed_same_bytes_other_seed_other_experts(tmp_path):
    make_dense(tmp_path / "dense")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        upcycle(tmp_path / "dense", tmp_path / name, FINE, UpcycleConfig(seed=seed, progress=False))
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards
    for s in shards:
        assert (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes()
    a, c = tensors(tmp_path / "a"), tensors(tmp_path / "c")
    for key in a:
        if ".mlp." in key:
            assert not torch.equal(a[key], c[key]), key
        else:
            assert torch.equal(a[key], c[key]), key


@pytest.mark.parametrize("method", ["random", "contiguous", "clustering"])
def test_split_partitions_the_dense_neurons(method, tmp_path):
    make_dense(tmp_path / "dense")
    upcycle(
        tmp_path / "dense",
        tmp_path / "moe",
        SPLIT6,
        # softmax gating: down unscaled, so every slot is a dense neuron bit for bit
        UpcycleConfig(strategy="split", split_method=method, split_gating="softmax", progress=False),
    )
    for layer in range(2):
        dense = _dense_mlp(tmp_path / "dense", layer)
        idx = torch.cat([_neurons(*ex, dense)[0] for ex in experts(tmp_path / "moe", layer, 6)])
        assert torch.equal(idx.sort().values, torch.arange(FFN)), "each dense neuron in exactly one expert"
        if method == "contiguous":
            assert torch.equal(idx, torch.arange(FFN))
        else:
            assert not torch.equal(idx, torch.arange(FFN))


@pytest.mark.parametrize(
    "gating, score_scale, norm_topk_prob, want_scale",
    [
        ("llama_moe", None, True, 6 / 2),  # LLaMA-MoE: renormalised top-k, output x E / K
        ("llama_moe", 2.5, True, 2.5),  # the factor given
        ("softmax", None, False, 1.0),  # Qwen2-MoE's router as the preset says
        ("softmax", 3.0, False, 3.0),
    ],
)
def test_split_gating(gating, score_scale, norm_topk_prob, want_scale, tmp_path):
    make_dense(tmp_path / "dense")
    cfg = UpcycleConfig(
        strategy="split",
        split_method="contiguous",
        split_gating=gating,
        split_score_scale=score_scale,
        progress=False,
    )
    upcycle(tmp_path / "dense", tmp_path / "moe", SPLIT6, cfg)
    rep = report(tmp_path / "moe")
    assert rep["plan"]["strategy_plan"]["score_scale"] == want_scale
    assert rep["plan"]["forced_fields"] == (
        {"norm_topk_prob": [False, True]} if gating == "llama_moe" else {}
    )
    moe_cfg, _ = read_config(tmp_path / "moe")
    assert moe_cfg.norm_topk_prob is norm_topk_prob
    dense, (gate, up, down) = _dense_mlp(tmp_path / "dense", 0), experts(tmp_path / "moe", 0, 6)[2]
    torch.testing.assert_close(gate, dense["gate"][32:48], rtol=0, atol=0)
    torch.testing.assert_close(up, dense["up"][32:48], rtol=0, atol=0)
    torch.testing.assert_close(down, want_scale * dense["down"][:, 32:48])


def test_balanced_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 32, generator=g)
    truth = torch.randperm(48, generator=g) % 6  # 8 points per cluster
    points = centers[truth] + 0.05 * torch.randn(48, 32, generator=g)
    labels, centroids = balanced_kmeans(points, 6, seeded_generator(0, 0, "kmeans"))
    assert torch.bincount(labels).tolist() == [8] * 6
    unit = points.double() / points.double().norm(dim=1, keepdim=True)
    for c in range(6):
        torch.testing.assert_close(centroids[c], unit[labels == c].mean(0))
    for c in range(6):  # the same partition up to renaming the clusters
        assert labels[truth == c].unique().numel() == 1


def test_seeded_generators_are_independent_streams():
    a = torch.randn(4, generator=seeded_generator(0, 3, "router"))
    assert torch.equal(a, torch.randn(4, generator=seeded_generator(0, 3, "router")))
    for other in ((1, 3, "router"), (0, 4, "router"), (0, 3, "replica", 0)):
        assert not torch.equal(a, torch.randn(4, generator=seeded_generator(*other)))


def test_centroid_router_rows_are_unit_centroid_directions_times_the_std(tmp_path):
    """Row e = std x sqrt(H) x (mean of expert e's L2-normalised up_proj rows, normalised): the k-means
    centroid's direction with entries of RMS router_init_std, like a normal row's."""
    make_dense(tmp_path / "dense")
    cfg = UpcycleConfig(
        strategy="split",
        split_method="clustering",
        router_init="centroids",
        router_init_std=0.05,
        progress=False,
    )
    upcycle(tmp_path / "dense", tmp_path / "moe", SPLIT6, cfg)
    for layer in range(2):
        router = tensors(tmp_path / "moe", f"model.layers.{layer}.mlp.gate.")[
            f"model.layers.{layer}.mlp.gate.weight"
        ]
        for e, (_, up, _) in enumerate(experts(tmp_path / "moe", layer, 6)):
            unit = up.double() / up.double().norm(dim=1, keepdim=True)
            direction = unit.mean(0) / unit.mean(0).norm()
            torch.testing.assert_close(
                router[e].double(), 0.05 * HIDDEN**0.5 * direction, rtol=1e-5, atol=1e-7
            )
        assert router.pow(2).mean().sqrt() == pytest.approx(0.05)
        assert not torch.allclose(router[0], router[1])


@pytest.mark.parametrize("strategy, shape", [("split", SPLIT6), ("finegrained", FINE)])
def test_zero_router_is_uniform(strategy, shape, tmp_path):
    """Zero rows: every expert equally likely (maximal entropy ln N), all tokens tie on the same top-k."""
    make_dense(tmp_path / "dense")
    upcycle(
        tmp_path / "dense",
        tmp_path / "moe",
        shape,
        UpcycleConfig(strategy=strategy, router_init="zeros", progress=False),
    )
    n, k = shape.num_experts, shape.num_experts_per_tok
    for layer in range(2):
        key = f"model.layers.{layer}.mlp.gate.weight"
        assert not tensors(tmp_path / "moe", key)[key].any()
    for stats in report(tmp_path / "moe")["init_distance"]["layers"]:
        assert stats["router_entropy"] == pytest.approx(math.log(n), rel=1e-6)  # fp32 softmax
        assert stats["max_load_ratio"] == pytest.approx(n / k)
        assert stats["dead_experts"] == pytest.approx((n - k) / n)


def test_granular_router_groups_hold_for_every_router_init(tmp_path):
    make_dense(tmp_path / "dense")
    shape = MoEShape(
        num_experts=8, num_experts_per_tok=4, moe_intermediate_size=24, shared_expert_intermediate_size=0
    )
    for init in ("normal", "zeros"):
        out = tmp_path / init
        upcycle(
            tmp_path / "dense",
            out,
            shape,
            UpcycleConfig(strategy="granular", router_init=init, progress=False),
        )
        router = tensors(out, "model.layers.0.mlp.gate.")["model.layers.0.mlp.gate.weight"]
        for e in range(8):
            assert torch.equal(router[e], router[(e // 4) * 4])
        assert init == "zeros" or not torch.equal(router[0], router[4])


@pytest.mark.parametrize("indices", ["shared", "per_matrix"])
def test_copy_with_drop_upcycling(indices, tmp_path):
    """Drop-Upcycling on coarse experts: half of each copy's neurons re-drawn. `shared` re-draws the same
    neurons in gate, up and down (whole neurons); `per_matrix` draws each matrix's slots independently."""
    make_dense(tmp_path / "dense")
    cfg = UpcycleConfig(strategy="copy", reinit_fraction=0.5, reinit_indices=indices, progress=False)
    upcycle(tmp_path / "dense", tmp_path / "moe", MoEShape(num_experts=4, num_experts_per_tok=2), cfg)
    rep = report(tmp_path / "moe")
    assert rep["plan"]["strategy_plan"] == {
        "copies_of_dense_ffn": 4,
        "exact_at_init": False,
        "reinit_per_expert": 48,
        "reinit_indices": indices,
    }
    assert min(layer["ffn_relative_error"] for layer in rep["init_distance"]["layers"]) > 0.1
    seen = []
    for layer in range(2):
        dense = _dense_mlp(tmp_path / "dense", layer)
        for gate, up, down in experts(tmp_path / "moe", layer, 4):  # slot j of a copy is dense neuron j
            drawn = [
                (gate != dense["gate"]).any(1),
                (up != dense["up"]).any(1),
                (down != dense["down"]).any(0),
            ]
            assert [int(d.sum()) for d in drawn] == [48, 48, 48]
            same = torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[1], drawn[2])
            assert same == (indices == "shared")
            seen.append(drawn[0])
    assert not torch.equal(seen[0], seen[1])  # each expert draws its own neurons


@pytest.mark.parametrize("indices", ["shared", "per_matrix"])
def test_finegrained_reinit_indices_in_the_plan(indices):
    dense_cfg = ModelConfig(num_experts=0, hidden_size=64, intermediate_size=96)
    cfg = UpcycleConfig(reinit_indices=indices).validate()
    moe_cfg, _ = plan_config(dense_cfg, FINE, cfg)
    plan = get_strategy("finegrained").plan_layer(0, moe_cfg, dense_cfg, cfg)
    assert plan.reinit_PNM.shape == (3, 10, 16) and plan.shared_reinit_PS.shape == (3, 32)
    assert plan.reinit_PNM.sum(-1).eq(8).all() and plan.shared_reinit_PS.sum(-1).eq(16).all()
    for masks in (plan.reinit_PNM, plan.shared_reinit_PS):
        equal = torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
        assert equal == (indices == "shared")
