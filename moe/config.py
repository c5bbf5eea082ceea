"""Model configuration: one typed schema for dense Qwen2 and fine-grained Qwen2-MoE decoders.

Design choices:
- Field names are Hugging Face's (`moe_intermediate_size`, `num_experts_per_tok`, ...) for everything
  that is exported, so `to_hf_dict()` / `from_hf_dict()` are plain renames, not translations.
- `num_experts == 0` means a dense model (Qwen2); otherwise a Qwen2-MoE model in which layer `i` is
  MoE iff `i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0` (transformers' rule).
- Parameter counts come from the config alone (`num_params()`), so a 14B model is sized without
  allocating a byte; a test checks them against the built module.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class ExpertBackend(str, enum.Enum):
    """How routed experts are computed. All backends give the same numbers for the same weights."""

    auto = "auto"  # megablocks on CUDA when installed, else torch
    torch = "torch"  # sort-based dispatch + torch.nn.functional.grouped_mm (CPU and CUDA)
    megablocks = "megablocks"  # megablocks' dropless permutation ops + grouped_gemm (CUDA only)


@dataclass(kw_only=True)
class ModelConfig:
    """A Qwen2 (dense) or Qwen2-MoE decoder. Defaults are a tiny MoE for tests."""

    vocab_size: int = 256
    """Embedding rows (tokens)."""
    hidden_size: int = 64
    """Residual stream width."""
    intermediate_size: int = 128
    """Dense SwiGLU width (dense models, and `mlp_only_layers` of MoE models)."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention); must divide `num_attention_heads`."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary table is meant for (tokens); informational, as in HF."""
    rope_theta: float = 1_000_000.0
    """Rotary base frequency."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the LM head with the token embedding."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""

    num_experts: int = 8
    """Routed experts per MoE layer; 0 makes a dense Qwen2 model."""
    num_experts_per_tok: int = 2
    """Routed experts each token is sent to (top-k)."""
    moe_intermediate_size: int = 32
    """SwiGLU width of one routed expert."""
    shared_expert_intermediate_size: int = 64
    """SwiGLU width of the always-on shared expert; 0 disables it (and its gate)."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing probabilities to sum to 1."""
    decoder_sparse_step: int = 1
    """Every `decoder_sparse_step`-th layer is MoE."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layer indices forced to a dense MLP."""
    router_aux_loss_coef: float = 0.001
    """Weight of the load-balancing loss (transformers' definition: equals top-k when balanced)."""
    router_z_loss_coef: float = 0.0
    """Weight of the ST-MoE router z-loss (mean over tokens of logsumexp(logits)^2)."""
    expert_backend: ExpertBackend = ExpertBackend.auto
    """Expert compute: auto | torch | megablocks."""

    bos_token_id: int | None = None
    """Written to config.json / generation_config.json when set."""
    eos_token_id: int | None = None
    """Written to config.json / generation_config.json when set."""
    sliding_window: int | None = None
    """config.json's `sliding_window`, kept so that the file round-trips (inert: sliding-window
    attention is not supported); None writes `max_position_embeddings`."""
    max_window_layers: int | None = None
    """config.json's `max_window_layers` (inert, as `sliding_window`); None writes the layer count."""

    # ---- derived values -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers whose MLP is a mixture of experts."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        """Raise ValueError naming the first offending field. Returns self for chaining."""
        positive = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "decoder_sparse_step",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must divide "
                f"model.hidden_size={self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim hidden_size/num_attention_heads={self.head_dim} must be even (RoPE)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_key_value_heads={self.num_key_value_heads} must divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_experts < 0:
            raise ValueError(f"model.num_experts must be >= 0, got {self.num_experts}")
        for i in self.mlp_only_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ValueError(f"model.mlp_only_layers holds {i}, outside [0, {self.num_hidden_layers})")
        needs_dense_mlp = not self.is_moe or len(self.moe_layers) < self.num_hidden_layers
        if needs_dense_mlp and self.intermediate_size <= 0:
            raise ValueError(f"model.intermediate_size must be positive, got {self.intermediate_size}")
        if self.is_moe:
            if self.moe_intermediate_size <= 0:
                raise ValueError(
                    f"model.moe_intermediate_size must be positive, got {self.moe_intermediate_size}"
                )
            if self.shared_expert_intermediate_size < 0:
                raise ValueError(
                    "model.shared_expert_intermediate_size must be >= 0 (0 disables the shared expert), "
                    f"got {self.shared_expert_intermediate_size}"
                )
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"model.num_experts_per_tok={self.num_experts_per_tok} must be in "
                    f"[1, model.num_experts={self.num_experts}]"
                )
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        try:
            ExpertBackend(self.expert_backend)
        except ValueError:
            choices = ", ".join(b.value for b in ExpertBackend)
            raise ValueError(
                f"model.expert_backend={self.expert_backend!r} is unknown; choose one of {choices}"
            ) from None
        return self

    # ---- parameter accounting ------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Parameter counts without allocating weights.

        Returns:
            ``total``, ``activated`` (what one token touches: embeddings, attention, norms, shared
            expert, router, top-k routed experts), ``embedding`` (token embedding + untied LM head)
            and ``activated_non_embedding``.
        """
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (+bias), k/v (+bias), o (no bias)
        norms = 2 * h
        dense_mlp = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        shared = (
            3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0
        )
        router = self.num_experts * h
        total = active = 0
        for i in range(self.num_hidden_layers):
            total += attn + norms
            active += attn + norms
            if self.is_moe_layer(i):
                total += router + shared + self.num_experts * expert
                active += router + shared + self.num_experts_per_tok * expert
            else:
                total += dense_mlp
                active += dense_mlp
        embedding = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        total += embedding + h  # + final norm
        active += embedding + h
        return {
            "total": total,
            "activated": active,
            "embedding": embedding,
            "activated_non_embedding": active - embedding,
        }

    # ---- Hugging Face config.json --------------------------------------------------------------
    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """config.json contents that transformers 4.x and 5.x both read.

        Top-level `rope_theta` and `torch_dtype` are written as well as 5.x's `rope_parameters`
        and `dtype`: 4.x silently falls back to theta=10000 without them.
        """
        d: dict[str, Any] = {
            "architectures": ["Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"],
            "model_type": "qwen2_moe" if self.is_moe else "qwen2",
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": self.sliding_window or self.max_position_embeddings,
            "max_window_layers": (
                self.max_window_layers if self.max_window_layers is not None else self.num_hidden_layers
            ),
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        }
        for f in ARCH_FIELDS:
            d[f] = getattr(self, f)
        if self.is_moe:
            for f in MOE_FIELDS:
                d[f] = getattr(self, f)
            d["mlp_only_layers"] = list(self.mlp_only_layers)
            d["output_router_logits"] = False
            d["qkv_bias"] = True
        for f in ("bos_token_id", "eos_token_id"):
            if getattr(self, f) is not None:
                d[f] = getattr(self, f)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> ModelConfig:
        """Build from a transformers Qwen2 / Qwen2-MoE config.json dict.

        A missing (or null) key takes transformers' default for the model type (`HF_DEFAULTS`), so
        that a file builds the model transformers builds from it; the keys that size the model
        (`_HF_REQUIRED`) must be present. RoPE scaling (YaRN, linear, ...) and activations other than
        SiLU are refused rather than silently replaced by plain RoPE / SiLU.

        Raises:
            ValueError: naming `source` and the key, for another architecture, a missing required key,
                an unsupported feature or an invalid value.
        """
        model_type = d.get("model_type")
        if model_type not in ("qwen2", "qwen2_moe"):
            archs = d.get("architectures")
            raise ValueError(
                f"{source}: model_type={model_type!r} (architectures={archs}) is not a Qwen2 or Qwen2-MoE model"
            )
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        act = d.get("hidden_act") or "silu"
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (only silu)")
        defaults = HF_DEFAULTS[model_type]
        fields = ARCH_FIELDS + MOE_FIELDS if model_type == "qwen2_moe" else ARCH_FIELDS
        kwargs: dict[str, Any] = {}
        for f in fields:
            if d.get(f) is not None:
                kwargs[f] = _checked_type(f, d[f], source)
            elif f in _HF_REQUIRED or (model_type == "qwen2_moe" and f in _HF_REQUIRED_MOE):
                raise ValueError(f"{source}: required key {f!r} is missing")
            elif f != "rope_theta":
                kwargs[f] = defaults[f]
        if d.get("num_key_value_heads", 0) is None:  # explicit null: transformers uses the query heads
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        kwargs["rope_theta"] = _rope_theta(d, source)
        kwargs["mlp_only_layers"] = list(kwargs.get("mlp_only_layers") or [])
        if model_type == "qwen2":
            kwargs["num_experts"] = 0
        for f in ("bos_token_id", "eos_token_id", "sliding_window", "max_window_layers"):
            v = d.get(f)
            if isinstance(v, int) and not isinstance(v, bool):
                kwargs[f] = v
        kwargs.update(overrides)
        try:
            return cls(**kwargs).validate()
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


ARCH_FIELDS = (  # the dense architecture, shared by Qwen2 and Qwen2-MoE
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
)
MOE_FIELDS = (  # the MoE shape on top of it (Qwen2-MoE config.json keys)
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
)

_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
"""Keys that size the model: a config.json without one is refused rather than given a default."""
_HF_REQUIRED_MOE = ("num_experts", "moe_intermediate_size")
_DEFAULT_ROPE_THETA = 10000.0
_QWEN2_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 22016,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "rope_theta": _DEFAULT_ROPE_THETA,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": _QWEN2_DEFAULTS,
    "qwen2_moe": _QWEN2_DEFAULTS
    | {
        "intermediate_size": 5632,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": 0.001,
    },
}
"""What transformers (4.x and 5.x) uses for a key missing from config.json, per model_type: the
defaults of `Qwen2Config()` / `Qwen2MoeConfig()` (checked against them in tests/moe/test_config.py)."""
_BOOL_FIELDS = ("tie_word_embeddings", "norm_topk_prob")
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "initializer_range", "router_aux_loss_coef")


def _checked_type(name: str, value: Any, source: str) -> Any:
    """`value` of config.json key `name`, or a ValueError naming both when its JSON type is wrong."""
    if name in _BOOL_FIELDS:
        ok = isinstance(value, bool)
    elif name in _FLOAT_FIELDS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif name == "mlp_only_layers":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"{source}: {name}={value!r} has the wrong type")
    return float(value) if name in _FLOAT_FIELDS else value


def _rope_theta(d: dict[str, Any], source: str) -> float:
    """The RoPE base of a config.json; refuses any RoPE type but default (YaRN, linear, dynamic, ...).

    transformers 5.x reads `rope_parameters` (and converts a legacy `rope_scaling`, whose older files
    name the type `type` rather than `rope_type`); 4.x reads top-level `rope_theta`. When both carry a
    theta they must agree, or the two versions would build different models.
    """
    thetas: dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: {key}={rope!r} is not an object")
        kind_key = "rope_type" if rope.get("rope_type") is not None else "type"
        kind = rope.get(kind_key) or "default"
        if kind != "default":
            raise ValueError(
                f"{source}: {key}.{kind_key}={kind!r} is not supported (only default RoPE; transformers "
                f"would apply {kind} scaling)"
            )
        if rope.get("rope_theta") is not None:
            thetas[f"{key}.rope_theta"] = rope["rope_theta"]
    if d.get("rope_theta") is not None:
        thetas["rope_theta"] = d["rope_theta"]
    for key, value in thetas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: {key}={value!r} has the wrong type")
    if len({float(v) for v in thetas.values()}) > 1:
        found = ", ".join(f"{k}={v}" for k, v in thetas.items())
        raise ValueError(f"{source}: {found} disagree (transformers 4.x and 5.x would use different ones)")
    return float(next(iter(thetas.values()), _DEFAULT_ROPE_THETA))
