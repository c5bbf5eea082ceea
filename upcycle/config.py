"""Upcycling configuration: the target MoE shape and the recipe that fills it.

Design choices:
- `MoEShape` holds only the fields an upcycling run may choose. Everything the dense source fixes
  (hidden size, layers, heads, vocabulary, RoPE, norms, tying, special tokens) is read from its
  config.json, so a preset can never silently disagree with the checkpoint it is applied to.
- `UpcycleConfig` holds the recipe. Fields that a strategy does not use are ignored by it (the
  docstrings say which strategy reads what); shape rules a strategy cannot meet are ValueErrors
  raised by the strategy, naming the fields and the rule.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe.hf import DEFAULT_MAX_SHARD_BYTES, parse_dtype


class Strategy(str, enum.Enum):
    """How the dense FFN becomes experts (math in `upcycle/strategies.py` and docs/upcycling.md)."""

    copy = "copy"  # sparse upcycling: every routed expert is the dense FFN (exact at init)
    # LLaMA-MoE: the FFN's neurons partitioned into experts, no replication. (The member shadows
    # str.split on Strategy values; nothing calls it, and Hydra matches choices by member name.)
    split = "split"  # type: ignore[assignment]
    finegrained = "finegrained"  # Qwen1.5-MoE / Qwen2 report: shuffled replicas cut into experts, 50% re-init
    granular = "granular"  # NVIDIA virtual groups: G shards x E copies, grouped router rows, weight scaling


class SplitMethod(str, enum.Enum):
    """How `split` partitions the neurons (LLaMA-MoE's neuron-independent methods)."""

    random = "random"  # an independent random partition per layer
    contiguous = "contiguous"  # neurons [e*m, (e+1)*m) form expert e
    clustering = "clustering"  # balanced k-means of the L2-normalised up_proj rows


class SplitGating(str, enum.Enum):
    """How `split` weights the selected experts at init (docs/upcycling.md: what each computes)."""

    # LLaMA-MoE's gate: softmax over the top-k (= renormalised top-k, norm_topk_prob forced true),
    # routed output x score_scale_factor (default E / K, the value LLaMA-MoE's docs give)
    llama_moe = "llama_moe"
    softmax = "softmax"  # Qwen2-MoE's router as the preset says (norm_topk_prob), scale 1 by default


class ReinitIndices(str, enum.Enum):
    """Which slots a re-initialisation re-draws in each of an expert's three matrices."""

    shared = "shared"  # the same neurons in gate, up and down (whole neurons; Drop-Upcycling's paper)
    per_matrix = "per_matrix"  # an independent draw per matrix (Drop-Upcycling's released code)


class RouterInit(str, enum.Enum):
    """The router rows at init (docs/upcycling.md, "Router initialisation")."""

    normal = "normal"  # N(0, router_init_std); tied within granular's virtual groups
    zeros = "zeros"  # a uniform router: every expert equally likely, top-k ties broken by index
    # split with clustering: each expert's balanced k-means centroid direction, entries of RMS router_init_std
    centroids = "centroids"


@dataclass(kw_only=True)
class MoEShape:
    """The MoE fields of the upcycled model; defaults are Qwen1.5-MoE-A2.7B's."""

    num_experts: int = 60
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 4
    """Routed experts each token is sent to (top-k)."""
    moe_intermediate_size: int = 1408
    """SwiGLU width of one routed expert (neurons)."""
    shared_expert_intermediate_size: int = 5632
    """SwiGLU width of the always-on shared expert (neurons); 0 for none."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1."""
    decoder_sparse_step: int = 1
    """Every `decoder_sparse_step`-th layer becomes MoE; the others keep the dense FFN."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layers that keep the dense FFN (copied unchanged)."""
    router_aux_loss_coef: float = 0.001
    """Load-balancing loss weight written to config.json (transformers' definition)."""
    intermediate_size: int | None = 5632
    """config.json `intermediate_size` when every layer is MoE (then unused by the model; the public
    A2.7B config has 5632). When a layer stays dense it copies the source FFN, so the source's width
    is written instead; null means the source's width always."""
    max_position_embeddings: int | None = 8192
    """config.json context length (tokens); the public A2.7B file has 8192 (its model was upcycled from
    Qwen-1.8B), Qwen1.5-1.8B says 32768. null keeps the source's."""
    max_window_layers: int | None = 21
    """config.json `max_window_layers` (unused without use_sliding_window); 21 in the public A2.7B file.
    null keeps the source's (its num_hidden_layers when it has none)."""

    def validate(self) -> MoEShape:
        """Raise ValueError naming the first offending field. Returns self."""
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"moe.{name} must be positive, got {getattr(self, name)}")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(
                f"moe.shared_expert_intermediate_size must be >= 0, got {self.shared_expert_intermediate_size}"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"moe.num_experts_per_tok={self.num_experts_per_tok} must be <= moe.num_experts={self.num_experts}"
            )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"moe.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"moe.intermediate_size must be positive or null, got {self.intermediate_size}")
        if self.max_position_embeddings is not None and self.max_position_embeddings <= 0:
            raise ValueError(
                f"moe.max_position_embeddings must be positive or null, got {self.max_position_embeddings}"
            )
        if self.max_window_layers is not None and self.max_window_layers < 0:
            raise ValueError(f"moe.max_window_layers must be >= 0 or null, got {self.max_window_layers}")
        return self

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> MoEShape:
        """Build from a dict of field values; an unknown key is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"moe: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(fields))

    def replace(self, **changes: Any) -> MoEShape:
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class CalibrationConfig:
    """Tokens on which the report measures how far the MoE starts from the dense model (upcycle/distance.py)."""

    path: str | None = None
    """Plain text files (one document each) or JSON lines (*.jsonl, *.json: one document per line): a
    file, a directory or a glob, tokenised with the source's tokenizer. null, or a source without a
    tokenizer: a fixed set of random token ids."""
    text_field: str = "text"
    """The document field of JSON lines."""
    num_sequences: int = 2
    """Sequences measured; 0 skips the measurement. The measurement runs beside the writer: at the
    A2.7B shape 256 tokens cost about as much CPU time as writing the checkpoint takes."""
    seq_len: int = 128
    """Tokens per sequence."""

    def validate(self) -> CalibrationConfig:
        """Raise ValueError naming the first offending field. Returns self."""
        if self.num_sequences < 0:
            raise ValueError(f"upcycle.calibration.num_sequences must be >= 0, got {self.num_sequences}")
        if self.seq_len < 2:
            raise ValueError(f"upcycle.calibration.seq_len must be >= 2, got {self.seq_len}")
        return self


@dataclass(kw_only=True)
class UpcycleConfig:
    """The upcycling recipe and how the output is written."""

    strategy: Strategy = Strategy.finegrained
    """copy | split | finegrained | granular."""
    split_method: SplitMethod = SplitMethod.random
    """split only: random | contiguous | clustering."""
    seed: int = 0
    """Every random draw (shuffles, re-initialisation, router) is a function of (seed, layer, purpose)."""
    reinit_fraction: float | None = None
    """copy and finegrained: fraction of each expert's neurons re-drawn from N(mean, std) of the dense
    matrix (Drop-Upcycling); null: 0.5 for finegrained (the Qwen2 report's 50%), 0 for copy."""
    reinit_indices: ReinitIndices = ReinitIndices.shared
    """shared (the same neurons in gate, up and down) | per_matrix (independent draws per matrix)."""
    router_init: RouterInit = RouterInit.normal
    """normal | zeros | centroids (split with split_method=clustering only)."""
    router_init_std: float = 0.02
    """Std of the normal router (and finegrained shared-expert gate) init; the per-entry RMS of centroid rows."""
    granular_exact: bool = False
    """granular only: scale routed down projections by G instead of the paper's cube root, which makes
    the model compute the dense function at init (needs norm_topk_prob and top-k a multiple of G)."""
    split_gating: SplitGating = SplitGating.llama_moe
    """split only: llama_moe (renormalised top-k, routed output x split_score_scale) | softmax (the
    preset's norm_topk_prob, scale 1 unless given)."""
    split_score_scale: float | None = None
    """split only: LLaMA-MoE's `score_scale_factor`, folded into every routed down projection (Qwen2-MoE
    has no field for it); null: num_experts / num_experts_per_tok with llama_moe gating, 1 with softmax."""
    dtype: str = "source"
    """Output dtype: source (the source tensors' dtype) | float32 | bfloat16 | float16."""
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    """Largest safetensors shard (bytes). Memory does not grow with it: tensors go straight to disk."""
    dry_run: bool = False
    """Print the plan (shapes, parameter counts, bytes) and write nothing."""
    overwrite: bool = False
    """Replace a non-empty output directory (only once the new one is complete)."""
    progress: bool = True
    """Show a progress bar over layers."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Tokens for the init distance in the report (skipped by dry runs)."""

    def validate(self) -> UpcycleConfig:
        """Raise ValueError naming the first offending field. Returns self."""
        for name, enum_cls in (
            ("strategy", Strategy),
            ("split_method", SplitMethod),
            ("split_gating", SplitGating),
            ("router_init", RouterInit),
            ("reinit_indices", ReinitIndices),
        ):
            try:
                setattr(self, name, enum_cls(getattr(self, name)))
            except ValueError:
                choices = ", ".join(c.value for c in enum_cls)
                raise ValueError(
                    f"upcycle.{name}={getattr(self, name)!r} is unknown; choose one of {choices}"
                ) from None
        if self.reinit_fraction is not None:
            if not 0.0 <= self.reinit_fraction <= 1.0:
                raise ValueError(f"upcycle.reinit_fraction must be in [0, 1], got {self.reinit_fraction}")
            if self.strategy not in (Strategy.copy, Strategy.finegrained):
                raise ValueError(
                    f"upcycle.reinit_fraction is used by strategies copy and finegrained, not {self.strategy.value}"
                    " (set it to null)"
                )
        if self.router_init_std < 0:
            raise ValueError(f"upcycle.router_init_std must be >= 0, got {self.router_init_std}")
        if self.router_init is RouterInit.centroids and (
            self.strategy is not Strategy.split or self.split_method is not SplitMethod.clustering
        ):
            raise ValueError(
                "upcycle.router_init=centroids uses the balanced k-means centroids of upcycle.strategy=split "
                f"with upcycle.split_method=clustering (got strategy={self.strategy.value}, "
                f"split_method={self.split_method.value})"
            )
        if self.split_score_scale is not None and self.split_score_scale <= 0:
            raise ValueError(
                f"upcycle.split_score_scale must be positive or null, got {self.split_score_scale}"
            )
        if self.max_shard_bytes <= 0:
            raise ValueError(f"upcycle.max_shard_bytes must be positive, got {self.max_shard_bytes}")
        self.calibration.validate()
        if self.dtype != "source":
            try:
                parse_dtype(self.dtype)
            except ValueError:
                raise ValueError(
                    f"upcycle.dtype={self.dtype!r} is unknown; choose source, float32, bfloat16 or float16"
                ) from None
        return self

    @property
    def reinit(self) -> float:
        """`reinit_fraction`, or the strategy's default: 0.5 for finegrained, else 0."""
        if self.reinit_fraction is not None:
            return float(self.reinit_fraction)
        return 0.5 if Strategy(self.strategy) is Strategy.finegrained else 0.0

    def replace(self, **changes: Any) -> UpcycleConfig:
        return dataclasses.replace(self, **changes)
