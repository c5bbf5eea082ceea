"""Decide an upcycling run and check every input before anything is written.

Design choices:
- The upcycled config takes every dense field (hidden size, layers, heads, vocabulary, RoPE, norms,
  tying, special tokens, FFN width) from the source's config.json and only the MoE fields from the
  requested `MoEShape`; a strategy may force some of those (reported as `forced`).
- `make_plan` reads config.json and safetensors headers only: the source's directory, config and
  weights, every tensor's shape against the config, the MoE shape against the strategy's rules and
  the output directory are all checked before the first byte is written.
- What only training can refuse (expert widths grouped GEMMs cannot run in bf16) is a warning in the
  plan, not an error: the checkpoint is still valid, and fp32 training or transformers can use it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe.config import MOE_FIELDS, ModelConfig
from moe.experts import check_grouped_mm_alignment
from moe.hf import (
    CheckpointReader,
    check_output_dir,
    dtype_name,
    empty_shared_expert,
    expected_hf_shapes,
    hf_config_dict,
    parse_dtype,
    read_config,
)
from upcycle.config import MoEShape, Strategy, UpcycleConfig
from upcycle.strategies import get_strategy

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}
_IGNORED_SOURCE_KEYS = ("rotary_emb.inv_freq",)  # buffers some older exports include


def plan_config(
    dense: ModelConfig, shape: MoEShape, cfg: UpcycleConfig
) -> tuple[ModelConfig, dict[str, list[Any]]]:
    """The upcycled model's config: dense fields from the source, MoE fields from `shape`.

    Returns:
        The validated MoE config and the fields the strategy forced, as {field: [requested, used]}.

    Raises:
        ValueError: naming the field and the rule when the strategy cannot realise the shape.
    """
    shape = dataclasses.replace(shape).validate()
    cfg = dataclasses.replace(cfg).validate()
    strategy = get_strategy(cfg.strategy)
    forced_values = strategy.forced_fields(dense, shape, cfg)
    forced = {k: [getattr(shape, k), v] for k, v in forced_values.items() if getattr(shape, k) != v}
    shape = shape.replace(**forced_values)
    moe = dense.replace(**{f: getattr(shape, f) for f in MOE_FIELDS})
    moe = moe.replace(mlp_only_layers=list(shape.mlp_only_layers))
    for i in moe.mlp_only_layers:
        if not 0 <= i < dense.num_hidden_layers:
            raise ValueError(f"moe.mlp_only_layers holds {i}, outside [0, {dense.num_hidden_layers})")
    if not moe.moe_layers:
        raise ValueError(
            "no layer would become MoE: moe.mlp_only_layers and moe.decoder_sparse_step="
            f"{moe.decoder_sparse_step} leave all {dense.num_hidden_layers} layers dense"
        )
    all_moe = len(moe.moe_layers) == moe.num_hidden_layers
    if all_moe and shape.intermediate_size is not None:  # else: dense layers copy the source's FFN
        moe = moe.replace(intermediate_size=shape.intermediate_size)
    if shape.max_position_embeddings is not None:
        moe = moe.replace(max_position_embeddings=shape.max_position_embeddings)
    moe.validate()
    strategy.check(moe, dense, cfg)
    return moe, forced


@dataclass
class UpcyclePlan:
    """Everything a run will do, decided and checked before anything is written."""

    source: Path
    output: Path
    cfg: UpcycleConfig
    shape: MoEShape
    """The MoE shape as requested (before the strategy's forced fields)."""
    dense: ModelConfig
    moe: ModelConfig
    forced: dict[str, list[Any]]
    source_dtype: torch.dtype
    dtype: torch.dtype
    strategy_summary: dict[str, Any]
    max_window_layers: int
    """Written to config.json (not a ModelConfig field: unused without sliding windows)."""
    source_context: tuple[int, int]
    """The source's (max_position_embeddings, max_window_layers), for the printed plan."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """What the output cannot do (e.g. bf16 training with grouped GEMMs); printed, not refused."""

    def config_json(self) -> dict[str, Any]:
        return config_json(self.moe, self.dtype, self.max_window_layers)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every output key with its shape, in file order."""
        return output_shapes(self.moe)

    @property
    def bytes_to_write(self) -> int:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return sum(math.prod(s) for s in self.shapes.values()) * itemsize

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the `plan` part of the report)."""
        moe = self.moe
        return {
            "strategy": self.cfg.strategy.value,
            "split_method": self.cfg.split_method.value if self.cfg.strategy is Strategy.split else None,
            "seed": self.cfg.seed,
            "forced_fields": self.forced,
            "strategy_plan": self.strategy_summary,
            "max_position_embeddings": moe.max_position_embeddings,
            "max_window_layers": self.max_window_layers,
            "moe_layers": moe.moe_layers,
            "dense_layers": [i for i in range(moe.num_hidden_layers) if not moe.is_moe_layer(i)],
            "num_params": moe.num_params(),
            "num_params_source": self.dense.num_params(),
            "bytes_to_write": self.bytes_to_write,
            "dtype": dtype_name(self.dtype),
            "source_dtype": dtype_name(self.source_dtype),
            "warnings": self.warnings,
        }

    def format(self) -> str:
        """The human-readable plan printed by the CLI (and by dry runs)."""
        d, m, c = self.dense, self.moe, self.cfg
        n = m.num_params()
        h, im, ish = m.hidden_size, m.moe_intermediate_size, m.shared_expert_intermediate_size
        strategy = c.strategy.value + (f" ({c.split_method.value})" if c.strategy is Strategy.split else "")
        shared = f" + shared expert {ish} (gated)" if ish else ", no shared expert"
        per_layer = f"router [{m.num_experts}, {h}]; expert gate/up [{im}, {h}], down [{h}, {im}]"
        if ish:
            per_layer += f"; shared gate/up [{ish}, {h}], down [{h}, {ish}], shared_expert_gate [1, {h}]"
        nbytes = self.bytes_to_write
        rows = [
            ("source", f"{self.source} (Qwen2, {dtype_name(self.source_dtype)})"),
            (
                "dense shape",
                f"hidden {d.hidden_size}, {d.num_hidden_layers} layers, FFN {d.intermediate_size}, "
                f"heads {d.num_attention_heads}/{d.num_key_value_heads}, vocab {d.vocab_size}",
            ),
            (
                "output",
                f"{self.output} ({dtype_name(self.dtype)}, shards <= {c.max_shard_bytes / 2**30:.2f} GiB)",
            ),
            ("strategy", f"{strategy}, seed {c.seed}"),
            (
                "MoE",
                f"{m.num_experts} routed x {im}, top-{m.num_experts_per_tok}, "
                f"norm_topk_prob={str(m.norm_topk_prob).lower()}{shared}; "
                f"{len(m.moe_layers)} of {m.num_hidden_layers} layers MoE",
            ),
        ]
        rows.append(
            (
                "context",
                f"max_position_embeddings {m.max_position_embeddings}, max_window_layers "
                f"{self.max_window_layers} (source: {self.source_context[0]}, {self.source_context[1]})",
            )
        )
        for field, (asked, used) in self.forced.items():
            rows.append(("forced", f"{field}: {_fmt(asked)} -> {_fmt(used)} (strategy {c.strategy.value})"))
        rows += [
            ("strategy plan", ", ".join(f"{k} {_fmt(v)}" for k, v in self.strategy_summary.items()) or "-"),
            ("per MoE layer", per_layer),
            (
                "parameters",
                f"total {_count(n['total'])}, activated {_count(n['activated'])}, "
                f"activated non-embedding {_count(n['activated_non_embedding'])} "
                f"(source {_count(d.num_params()['total'])})",
            ),
            (
                "bytes to write",
                f"{nbytes / 1e9:.2f} GB ({nbytes:,} B), about {math.ceil(nbytes / c.max_shard_bytes)} shards",
            ),
        ]
        rows += [("warning", w) for w in self.warnings]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def alignment_warnings(moe: ModelConfig, dense: ModelConfig, strategy: Strategy) -> list[str]:
    """Expert widths that grouped GEMMs cannot run (`moe.experts.check_grouped_mm_alignment`): training
    would refuse them only at start-up, after the whole checkpoint was written. Each warning names the
    field, the dtypes affected and the nearest widths that work."""
    out: list[str] = []
    fields = (("moe.moe_intermediate_size", moe.moe_intermediate_size), ("hidden_size", moe.hidden_size))
    for name, value in fields:
        failing = [dt for dt in (torch.bfloat16, torch.float32) if _misaligned(name, value, dt)]
        if not failing:
            continue
        multiple = 16 // torch.empty((), dtype=failing[0]).element_size()
        lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
        fix = f"nearest multiples of {multiple}: " + ", ".join(str(w) for w in (lower, upper) if w > 0)
        if name == "hidden_size":
            fix = f"it comes from the source ({dense.hidden_size}) and cannot be changed here"
        elif strategy is Strategy.split:
            fix += f"; widths that split the source's FFN {dense.intermediate_size} evenly: " + ", ".join(
                f"{w} ({dense.intermediate_size // w} experts)"
                for w in _nearest_divisors(dense.intermediate_size, value, multiple)
            )
        which = " and ".join(dtype_name(dt) for dt in failing)
        works = "" if torch.float32 in failing else " (fp32 training works)"
        out.append(
            f"{name}={value} is not a multiple of {multiple}: grouped GEMMs cannot run the routed experts in "
            f"{which}, so training in {which} will refuse this model{works}; {fix}"
        )
    return out


def _misaligned(name: str, value: int, dtype: torch.dtype) -> bool:
    try:  # the other width at a value aligned for every dtype, so that only `name` is checked
        if name == "hidden_size":
            check_grouped_mm_alignment(value, 16, dtype)
        else:
            check_grouped_mm_alignment(16, value, dtype)
    except ValueError:
        return True
    return False


def _nearest_divisors(total: int, near: int, multiple: int) -> list[int]:
    """The divisors of `total` that are multiples of `multiple`, closest below and above `near`."""
    ok = [w for w in range(multiple, total + 1, multiple) if total % w == 0]
    below, above = [w for w in ok if w < near], [w for w in ok if w > near]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def config_json(moe: ModelConfig, dtype: torch.dtype, max_window_layers: int) -> dict[str, Any]:
    """The upcycled config.json: `hf_config_dict`, with the chosen `max_window_layers`."""
    return hf_config_dict(moe, dtype) | {"max_window_layers": max_window_layers}


def window_layers(shape: MoEShape, dense: ModelConfig, raw: Mapping[str, Any]) -> int:
    """`moe.max_window_layers`, or the source's (its layer count when its config.json has none)."""
    if shape.max_window_layers is not None:
        return shape.max_window_layers
    return int(raw.get("max_window_layers") or dense.num_hidden_layers)


def output_shapes(moe: ModelConfig) -> dict[str, tuple[int, ...]]:
    """`expected_hf_shapes`, plus the zero-width shared expert of MoE layers without one.

    transformers' Qwen2-MoE always builds a shared expert; writing it empty (and its gate zero) lets
    `from_pretrained` load without "newly initialized" weights.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    last_expert = f".mlp.experts.{moe.num_experts - 1}.down_proj.weight"
    for key, shape in expected_hf_shapes(moe).items():
        shapes[key] = shape
        if key.endswith(last_expert) and moe.shared_expert_intermediate_size == 0:
            layer = int(key.split(".")[2])
            shapes |= {k: tuple(t.shape) for k, t in empty_shared_expert(moe, layer)}
    return shapes


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def _stored_dtypes(reader: CheckpointReader) -> dict[str, str]:
    """Every tensor's safetensors dtype string, from the file headers only."""
    out: dict[str, str] = {}
    for path in sorted(set(reader.key_to_file.values())):
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the safetensors header ({e})") from None
        out |= {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return out


def _check_source(source: Path) -> tuple[ModelConfig, dict[str, Any], CheckpointReader]:
    dense, raw = read_config(source)
    if dense.is_moe or raw.get("model_type") == "qwen2_moe":
        raise ValueError(
            f"{source} is already a Qwen2-MoE model (num_experts={raw.get('num_experts')}); "
            "upcycling needs a dense Qwen2 checkpoint"
        )
    reader = CheckpointReader(source)
    expected = expected_hf_shapes(dense)
    for key, shape in expected.items():
        if key not in reader:
            raise ValueError(f"{source}: tensor {key!r} is missing from the checkpoint")
        reader.check_shape(key, shape)
    extra = [
        k
        for k in reader.key_to_file
        if k not in expected
        and not (k == "lm_head.weight" and dense.tie_word_embeddings)
        and not k.endswith(_IGNORED_SOURCE_KEYS)
    ]
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ValueError(
            f"{source}: tensors a Qwen2 model with this config.json does not have: {extra[:5]}{more}"
        )
    return dense, raw, reader


def make_plan(
    source: str | Path, output: str | Path, shape: MoEShape | Mapping[str, Any], cfg: UpcycleConfig
) -> UpcyclePlan:
    """Check every input and decide the run; reads config.json and safetensors headers only.

    Raises:
        ValueError: for a missing or unreadable source, a non-Qwen2 or MoE source, tensors that disagree
            with the source config, an MoE shape the strategy cannot realise, or a non-empty output
            directory without `overwrite`.
    """
    source, output = Path(source), Path(output)
    shape = shape if isinstance(shape, MoEShape) else MoEShape.from_mapping(shape)
    cfg = dataclasses.replace(cfg).validate()
    dense, raw, reader = _check_source(source)
    moe, forced = plan_config(dense, shape, cfg)
    moe = moe.replace(max_window_layers=window_layers(shape, dense, raw))  # carried into training's exports
    dtypes = _stored_dtypes(reader)
    ffn_key = f"model.layers.{moe.moe_layers[0]}.mlp.gate_proj.weight"
    for key, name in dtypes.items():
        if name not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"{source}: tensor {key!r} is stored as {name}; only float checkpoints are upcycled"
            )
    source_dtype = _SAFETENSORS_DTYPES[dtypes[ffn_key]]
    dtype = source_dtype if cfg.dtype == "source" else parse_dtype(cfg.dtype)
    if output.exists() and output.resolve() == source.resolve():
        raise ValueError(f"output {output} is the source directory; choose a new directory")
    check_output_dir(output, cfg.overwrite, "upcycle.overwrite")
    summary = get_strategy(cfg.strategy).summary(moe, dense, cfg)
    source_context = (
        dense.max_position_embeddings,
        window_layers(shape.replace(max_window_layers=None), dense, raw),
    )
    return UpcyclePlan(
        source,
        output,
        cfg,
        shape,
        dense,
        moe,
        forced,
        source_dtype,
        dtype,
        summary,
        window_layers(shape, dense, raw),
        source_context,
        alignment_warnings(moe, dense, cfg.strategy),
    )
