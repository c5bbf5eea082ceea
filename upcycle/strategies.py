"""Upcycling strategies: which dense neurons fill which expert, with what scale and router.

Shape legend: H hidden, F dense FFN width, N routed experts, m routed expert width, S shared expert
width, K experts per token (top-k), G granularity (shards of the dense FFN), E copies of each shard,
r replicas of the dense FFN.

A SwiGLU FFN is a sum over its intermediate *neurons*: neuron j is the triple (gate row W_g[j], up
row W_u[j], down column W_d[:, j]) and FFN(x) = sum_j W_d[:, j] * silu(W_g[j] . x) * (W_u[j] . x).
An expert is a list of neuron slots, so every strategy is a `LayerPlan`: for each slot, the dense
neuron it copies (or -1 for a new neuron: random gate/up rows, zero down column, which adds nothing
to the output but still receives gradients), whether it is re-initialised, a scale per projection,
and how the router rows are initialised. `upcycle/build.py` turns a plan and the dense weights into
tensors; the math of each strategy is in its class docstring and in docs/upcycling.md.

Every random draw comes from `seeded_generator(seed, layer, purpose...)`, so a layer's plan does not
depend on the order in which layers (or experts) are built, and a run is reproducible from `seed`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moe.config import ModelConfig
from upcycle.clustering import balanced_kmeans
from upcycle.config import (
    MoEShape,
    ReinitIndices,
    RouterInit,
    SplitGating,
    SplitMethod,
    Strategy,
    UpcycleConfig,
)


def seeded_generator(seed: int, layer: int, *purpose: object) -> torch.Generator:
    """A CPU generator seeded from a hash of (seed, layer, purpose...): independent streams per use."""
    digest = hashlib.sha256(repr((int(seed), int(layer), *purpose)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class Scales:
    """Factors on an expert's gate rows, up rows and down columns."""

    gate: float = 1.0
    up: float = 1.0
    down: float = 1.0


@dataclass
class LayerPlan:
    """Where every neuron of one MoE layer comes from."""

    routed_NM: torch.Tensor
    """int64 [N, m]: dense neuron copied into each routed slot; -1 = new neuron."""
    shared_S: torch.Tensor
    """int64 [S]: dense neuron copied into each shared-expert slot; -1 = new neuron."""
    reinit_PNM: torch.Tensor
    """bool [3, N, m]: slot re-drawn from N(mean, std) of the dense matrix, per matrix P (gate rows,
    up rows, down columns); the three are equal with reinit_indices=shared."""
    shared_reinit_PS: torch.Tensor
    """bool [3, S]: the same for the shared expert."""
    routed_scales: Scales = Scales()
    shared_scales: Scales = Scales()
    router_group: int = 1
    """Router rows are identical within each block of this many consecutive experts."""
    centroids_NH: torch.Tensor | None = None
    """float64 [N, H]: each expert's unit centroid direction (split with clustering), for router_init=centroids."""
    shared_gate_zero: bool = False
    """shared_expert_gate.weight = 0 (sigmoid 1/2) instead of a random normal row."""

    def neuron_counts(self, dense_width: int, include_reinit: bool = False) -> torch.Tensor:
        """int64 [F]: how many slots (routed and shared) copy each dense neuron (in all three matrices,
        unless `include_reinit`)."""
        idx = torch.cat([self.routed_NM.flatten(), self.shared_S])
        redrawn = torch.cat([self.reinit_PNM.any(0).flatten(), self.shared_reinit_PS.any(0)])
        idx = idx[(redrawn.logical_not() | include_reinit) & (idx >= 0)]
        return torch.bincount(idx, minlength=dense_width)


def _no_reinit(n: int, m: int) -> torch.Tensor:
    return torch.zeros(3, n, m, dtype=torch.bool)


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def reinit_masks(width: int, num: int, cfg: UpcycleConfig, layer: int, *who: object) -> torch.Tensor:
    """bool [3, len(who), width]: round(reinit x width) slots re-drawn in each of expert who[i]'s
    matrices, the same slots in all three (shared) or an independent draw per matrix (per_matrix)."""
    masks = torch.zeros(3, len(who), width, dtype=torch.bool)
    for i, w in enumerate(who):
        if ReinitIndices(cfg.reinit_indices) is ReinitIndices.shared:
            masks[
                :, i, torch.randperm(width, generator=seeded_generator(cfg.seed, layer, "reinit", w))[:num]
            ] = True
        else:
            for p, proj in enumerate(PROJECTIONS):
                g = seeded_generator(cfg.seed, layer, "reinit", w, proj)
                masks[p, i, torch.randperm(width, generator=g)[:num]] = True
    return masks


class UpcycleStrategy:
    """Interface: fields a strategy fixes, the shape rules it needs, and one layer's plan."""

    name: ClassVar[Strategy]

    def forced_fields(self, dense: ModelConfig, shape: MoEShape, cfg: UpcycleConfig) -> dict[str, Any]:
        """MoE fields this strategy sets whatever the preset says (reported in the plan)."""
        return {}

    def check(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> None:
        """Raise ValueError naming the fields and the rule if `moe` cannot be realised."""

    def summary(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> dict[str, Any]:
        """Numbers for the printed plan and the report."""
        return {}

    def plan_layer(
        self,
        layer: int,
        moe: ModelConfig,
        dense: ModelConfig,
        cfg: UpcycleConfig,
        up_FH: torch.Tensor | None = None,
    ) -> LayerPlan:
        """The plan of MoE layer `layer`; `up_FH` (the dense up_proj) is needed only by clustering."""
        raise NotImplementedError


class Copy(UpcycleStrategy):
    """Sparse upcycling (Komatsuzaki et al. 2022; Mixtral-style), and Drop-Upcycling (Nakamura et al. 2025).

    Every routed expert is the whole dense FFN: E_e = FFN for all e, no shared expert, random router,
    top-k weights renormalised. Then y = sum_{k in topK} w_k E_k(x) = (sum_k w_k) FFN(x) = FFN(x):
    the model computes exactly the dense function at init, whatever the router.
    With reinit_fraction r > 0 (Drop-Upcycling; its main setting is r = 0.5 on coarse experts),
    round(r F) slots of every expert are re-drawn from N(mean, std) of the dense matrix, chosen per
    expert (reinit_indices: the same neurons in the three matrices, or per matrix): the experts
    differ from the start and the model is no longer exact.
    Forces moe_intermediate_size = F, shared_expert_intermediate_size = 0, norm_topk_prob = true.
    """

    name = Strategy.copy

    def forced_fields(self, dense: ModelConfig, shape: MoEShape, cfg: UpcycleConfig) -> dict[str, Any]:
        return {
            "moe_intermediate_size": dense.intermediate_size,
            "shared_expert_intermediate_size": 0,
            "norm_topk_prob": True,
        }

    def summary(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> dict[str, Any]:
        k = _num_reinit(cfg.reinit, dense.intermediate_size)
        out: dict[str, Any] = {"copies_of_dense_ffn": moe.num_experts, "exact_at_init": k == 0}
        if k:
            out |= {"reinit_per_expert": k, "reinit_indices": cfg.reinit_indices.value}
        return out

    def plan_layer(self, layer, moe, dense, cfg, up_FH=None) -> LayerPlan:
        n, f = moe.num_experts, dense.intermediate_size
        return LayerPlan(
            routed_NM=torch.arange(f).expand(n, f).clone(),
            shared_S=torch.empty(0, dtype=torch.long),
            reinit_PNM=reinit_masks(f, _num_reinit(cfg.reinit, f), cfg, layer, *range(n)),
            shared_reinit_PS=torch.zeros(3, 0, dtype=torch.bool),
        )


class Split(UpcycleStrategy):
    """LLaMA-MoE (Zhu et al. 2024), neuron-independent construction.

    The F dense neurons are partitioned into N disjoint index sets S_1..S_N of m = F / N neurons and
    E_e(x) = sum_{j in S_e} W_d[:, j] silu(W_g[j] . x)(W_u[j] . x), so sum_e E_e = FFN exactly and no
    neuron is replicated. The partition is `random` (an independent random permutation per layer),
    `contiguous` (S_e = [e m, (e+1) m)) or `clustering` (balanced k-means of the L2-normalised up_proj
    rows, LLaMA-MoE's default `proj_type`). Only K of the N pieces run per token, so the model is not
    the dense function at init. Gating (`split_gating`):
    - llama_moe (default): LLaMA-MoE's TopKBalancedNoisyGate, a softmax over the top-k logits, i.e.
      renormalised top-k (norm_topk_prob forced true), and its calculator's `score_scale_factor` s on
      the routed output: y = s sum_{k in topK} (p_k / sum_topK p) E_k(x), s = N / K unless given.
    - softmax: Qwen2-MoE's router with the preset's norm_topk_prob and s = 1 unless given.
    Qwen2-MoE has no output-scale field, so s is folded into every routed down projection (the same
    function; under training the scale then sits in the weights instead of a constant multiplier).
    Rules: shared_expert_intermediate_size = 0, num_experts x moe_intermediate_size = F.
    """

    name = Strategy.split

    @staticmethod
    def score_scale(moe: ModelConfig, cfg: UpcycleConfig) -> float:
        if cfg.split_score_scale is not None:
            return float(cfg.split_score_scale)
        if SplitGating(cfg.split_gating) is SplitGating.llama_moe:
            return moe.num_experts / moe.num_experts_per_tok
        return 1.0

    def forced_fields(self, dense: ModelConfig, shape: MoEShape, cfg: UpcycleConfig) -> dict[str, Any]:
        if SplitGating(cfg.split_gating) is SplitGating.llama_moe:
            return {"norm_topk_prob": True}
        return {}

    def check(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> None:
        n, m, f = moe.num_experts, moe.moe_intermediate_size, dense.intermediate_size
        if moe.shared_expert_intermediate_size != 0:
            raise ValueError(
                "strategy split partitions the dense FFN among routed experts only: set "
                f"moe.shared_expert_intermediate_size=0 (got {moe.shared_expert_intermediate_size})"
            )
        if n * m != f:
            raise ValueError(
                "strategy split partitions the dense neurons without replication: moe.num_experts x "
                f"moe.moe_intermediate_size must equal the source's intermediate_size, got {n} x {m} = {n * m} "
                f"!= {f}"
            )

    def summary(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> dict[str, Any]:
        return {
            "split_method": cfg.split_method.value,
            "gating": cfg.split_gating.value,
            "score_scale": self.score_scale(moe, cfg),
        }

    def plan_layer(self, layer, moe, dense, cfg, up_FH=None) -> LayerPlan:
        n, m, f = moe.num_experts, moe.moe_intermediate_size, dense.intermediate_size
        method = SplitMethod(cfg.split_method)
        centroids = None
        if method is SplitMethod.contiguous:
            routed = torch.arange(f).view(n, m)
        elif method is SplitMethod.random:
            routed = torch.randperm(f, generator=seeded_generator(cfg.seed, layer, "split")).view(n, m)
        else:
            if up_FH is None:
                raise ValueError("split_method=clustering needs the dense up_proj weights")
            labels_F, centroids_NH = balanced_kmeans(up_FH, n, seeded_generator(cfg.seed, layer, "kmeans"))
            routed = torch.stack([(labels_F == e).nonzero().squeeze(1) for e in range(n)])
            centroids = centroids_NH / centroids_NH.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return LayerPlan(
            routed_NM=routed,
            shared_S=torch.empty(0, dtype=torch.long),
            reinit_PNM=_no_reinit(n, m),
            shared_reinit_PS=torch.zeros(3, 0, dtype=torch.bool),
            routed_scales=Scales(down=self.score_scale(moe, cfg)),
            centroids_NH=centroids,
        )


class FineGrained(UpcycleStrategy):
    """Qwen1.5-MoE's initialisation (Qwen2 technical report, "expert initialization").

    With r = ceil((N m + S) / F) replicas of the dense FFN, replica i's neurons are shuffled by an
    independent permutation pi_i; the pool pi_0 ++ pi_1 ++ ... (r F neurons) is cut into N routed
    experts of m neurons, then the shared expert's S neurons, and the r F - N m - S leftovers are
    dropped (A2.7B from 1.8B: r = ceil((60 x 1408 + 5632) / 5504) = 17). So every expert is made of
    dense neurons, no neuron appears twice within a replica, and each appears at most r times.
    Then round(reinit_fraction x m) slots of every routed expert (and of the shared expert) are chosen
    at random and re-drawn: gate row ~ N(mean(W_g), std(W_g)), up row ~ N(mean(W_u), std(W_u)), down
    column ~ N(mean(W_d), std(W_d)), with the statistics of the whole dense matrix of that layer; the
    same slots in the three matrices, or (reinit_indices=per_matrix) a draw per matrix. The report
    says "randomly reinitialize 50% of the parameters" without the distribution; this is
    Drop-Upcycling's scheme (Nakamura et al. 2025). Router and shared-expert gate: N(0, router_init_std).
    """

    name = Strategy.finegrained

    @staticmethod
    def num_replicas(moe: ModelConfig, dense: ModelConfig) -> int:
        needed = moe.num_experts * moe.moe_intermediate_size + moe.shared_expert_intermediate_size
        return math.ceil(needed / dense.intermediate_size)

    def summary(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> dict[str, Any]:
        r = self.num_replicas(moe, dense)
        used = moe.num_experts * moe.moe_intermediate_size + moe.shared_expert_intermediate_size
        return {
            "replicas": r,
            "pool_neurons": r * dense.intermediate_size,
            "used_neurons": used,
            "discarded_neurons": r * dense.intermediate_size - used,
            "reinit_per_expert": _num_reinit(cfg.reinit, moe.moe_intermediate_size),
            "reinit_shared": _num_reinit(cfg.reinit, moe.shared_expert_intermediate_size),
            "reinit_indices": cfg.reinit_indices.value,
        }

    def plan_layer(self, layer, moe, dense, cfg, up_FH=None) -> LayerPlan:
        n, m, s, f = (
            moe.num_experts,
            moe.moe_intermediate_size,
            moe.shared_expert_intermediate_size,
            dense.intermediate_size,
        )
        pool = torch.cat(
            [
                torch.randperm(f, generator=seeded_generator(cfg.seed, layer, "replica", i))
                for i in range(self.num_replicas(moe, dense))
            ]
        )
        return LayerPlan(
            routed_NM=pool[: n * m].view(n, m).clone(),
            shared_S=pool[n * m : n * m + s].clone(),
            reinit_PNM=reinit_masks(m, _num_reinit(cfg.reinit, m), cfg, layer, *range(n)),
            shared_reinit_PS=reinit_masks(s, _num_reinit(cfg.reinit, s), cfg, layer, "shared")[:, 0],
        )


def _num_reinit(fraction: float, width: int) -> int:
    return math.floor(fraction * width + 0.5)


class Granular(UpcycleStrategy):
    """NVIDIA's virtual-group upcycling ("Upcycling Large Language Models into Mixture of Experts", 2024).

    The shared expert (if S > 0) takes dense neurons [0, S), with shared_expert_gate = 0 (sigmoid = 1/2)
    and its down projection x 2, so it contributes exactly its neurons' share of FFN(x). The remaining
    F - S neurons are cut into G = ceil((F - S) / m) contiguous shards of m neurons (the last one padded
    with new neurons: random gate/up, zero down), and routed expert e is copy e // G of shard e mod G
    (E = N / G copies). Router rows are identical within each virtual group {gG, ..., gG + G - 1}, so
    every group has the same probability for all its members and top-k picks whole groups, i.e. one
    copy of every shard, when K is a multiple of G.
    Default (the paper's weight scaling, Megatron's `_get_moe_activation_scale`): gate, up and down of
    every routed expert x a^(1/3), where a is how much a uniform router shrinks the routed output:
    a = E G^2 / K with softmax-then-top-k (norm_topk_prob=false: each selected weight 1 / (E G), each
    shard selected K / G times) and a = G with renormalised top-k (norm_topk_prob=true: each selected
    weight 1 / K). The cube root per matrix restores a exactly for a degree-3 homogeneous FFN (squared
    ReLU); for SwiGLU each neuron is off by sigmoid(c z) / sigmoid(z), c = a^(1/3), z its gate
    pre-activation (1 at z = 0 and as z -> inf).
    `granular_exact`: routed down x G instead. With norm_topk_prob and K = cG, the K selected weights
    are p_g / (G sum_g' p_g') for c groups, so y_routed = sum_g p_g / (G sum p) x G x sum_shards = the
    routed neurons' share of FFN(x) exactly (reference.md 3.iii).
    Rules: S < F; num_experts a multiple of G; exact also needs norm_topk_prob and K a multiple of G.
    """

    name = Strategy.granular

    @staticmethod
    def granularity(moe: ModelConfig, dense: ModelConfig) -> int:
        routed_neurons = dense.intermediate_size - moe.shared_expert_intermediate_size
        return math.ceil(routed_neurons / moe.moe_intermediate_size)

    def check(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> None:
        f, s, m = dense.intermediate_size, moe.shared_expert_intermediate_size, moe.moe_intermediate_size
        if s >= f:
            raise ValueError(
                "strategy granular takes the shared expert's neurons from the dense FFN and shards the rest: "
                f"moe.shared_expert_intermediate_size={s} must be < the source's intermediate_size={f}"
            )
        g = self.granularity(moe, dense)
        if moe.num_experts % g:
            raise ValueError(
                f"strategy granular: moe.num_experts={moe.num_experts} must be a multiple of G = "
                f"ceil((intermediate_size - moe.shared_expert_intermediate_size) / moe.moe_intermediate_size)"
                f" = ceil(({f} - {s}) / {m}) = {g}"
            )
        if cfg.granular_exact:
            if not moe.norm_topk_prob:
                raise ValueError(
                    "upcycle.granular_exact=true needs renormalised top-k weights: set moe.norm_topk_prob=true"
                )
            if moe.num_experts_per_tok % g:
                raise ValueError(
                    f"upcycle.granular_exact=true needs moe.num_experts_per_tok={moe.num_experts_per_tok} to be "
                    f"a multiple of G = {g} (top-k must select whole virtual groups)"
                )
            if RouterInit(cfg.router_init) is RouterInit.zeros or cfg.router_init_std == 0:
                raise ValueError(
                    "upcycle.granular_exact=true needs router rows that differ between virtual groups: "
                    "router_init=zeros (or router_init_std=0) ties every group, and top-k then picks "
                    "experts by index, not whole groups; use router_init=normal with router_init_std > 0"
                )

    def activation_scale(self, moe: ModelConfig, dense: ModelConfig) -> float:
        """a: the routed output under a uniform router is 1 / a times the routed neurons' share of FFN(x)."""
        g = self.granularity(moe, dense)
        if moe.norm_topk_prob:  # top-k then renormalise: K weights of 1 / K, each shard K / G times
            return float(g)
        e = moe.num_experts // g  # softmax then top-k: K weights of 1 / (E G), each shard K / G times
        return e * g * g / moe.num_experts_per_tok

    def scale(self, moe: ModelConfig, dense: ModelConfig) -> float:
        """The factor on each of gate, up and down: a^(1/3) (their product is a)."""
        return self.activation_scale(moe, dense) ** (1.0 / 3.0)

    def summary(self, moe: ModelConfig, dense: ModelConfig, cfg: UpcycleConfig) -> dict[str, Any]:
        g = self.granularity(moe, dense)
        out: dict[str, Any] = {
            "granularity_G": g,
            "copies_E": moe.num_experts // g,
            "padding_neurons": g * moe.moe_intermediate_size
            - (dense.intermediate_size - moe.shared_expert_intermediate_size),
            "exact_at_init": bool(cfg.granular_exact),
        }
        if cfg.granular_exact:
            out["routed_down_scale"] = g
        else:
            out["routed_activation_scale"] = self.activation_scale(moe, dense)
            out["routed_weight_scale"] = self.scale(moe, dense)
        return out

    def plan_layer(self, layer, moe, dense, cfg, up_FH=None) -> LayerPlan:
        n, m, s, f = (
            moe.num_experts,
            moe.moe_intermediate_size,
            moe.shared_expert_intermediate_size,
            dense.intermediate_size,
        )
        g = self.granularity(moe, dense)
        shards_GM = torch.full((g * m,), -1, dtype=torch.long)
        shards_GM[: f - s] = torch.arange(s, f)
        shards_GM = shards_GM.view(g, m)
        routed = shards_GM[torch.arange(n) % g]
        if cfg.granular_exact:
            scales = Scales(down=float(g))
        else:
            c = self.scale(moe, dense)
            scales = Scales(gate=c, up=c, down=c)
        return LayerPlan(
            routed_NM=routed,
            shared_S=torch.arange(s),
            reinit_PNM=_no_reinit(n, m),
            shared_reinit_PS=torch.zeros(3, s, dtype=torch.bool),
            routed_scales=scales,
            shared_scales=Scales(down=2.0),
            router_group=g,
            shared_gate_zero=True,
        )


STRATEGIES: dict[Strategy, UpcycleStrategy] = {
    s.name: s for s in (Copy(), Split(), FineGrained(), Granular())
}


def get_strategy(name: Strategy | str) -> UpcycleStrategy:
    return STRATEGIES[Strategy(name)]
