"""The default recipe reproduces Qwen1.5-MoE-A2.7B's shape; plans and dry runs need no weights."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from moe.config import ModelConfig
from moe.hf import expected_hf_shapes, hf_config_dict
from moe.params import load_preset
from upcycle import MoEShape, UpcycleConfig, plan_config, upcycle
from upcycle.plan import config_json, make_plan, output_shapes

# Qwen/Qwen1.5-MoE-A2.7B config.json (reference.md section 1)
PUBLIC_A2_7B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 151936,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],  # absent from the public file, i.e. []
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}
PUBLIC_TOTAL_SIZE = 28_631_568_384  # model.safetensors.index.json of the public checkpoint
PUBLIC_NUM_KEYS = 4659


def qwen1_5_1_8b() -> ModelConfig:
    return load_preset("qwen1_5_1_8b")


def test_default_recipe_matches_qwen1_5_moe_a2_7b():
    moe, forced = plan_config(qwen1_5_1_8b(), MoEShape(), UpcycleConfig())
    assert forced == {}
    n = moe.num_params()
    assert abs(n["total"] / 1e9 - 14.3) <= 0.1
    assert abs(n["activated"] / 1e9 - 2.7) <= 0.1
    assert abs(n["activated_non_embedding"] / 1e9 - 2.0) <= 0.1
    shapes = output_shapes(moe)
    assert len(shapes) == PUBLIC_NUM_KEYS
    assert sum(math.prod(s) for s in shapes.values()) * 2 == PUBLIC_TOTAL_SIZE
    written = config_json(moe, torch.bfloat16, MoEShape().max_window_layers)
    for key, value in PUBLIC_A2_7B.items():
        assert written[key] == value, key
    assert written["rope_parameters"]["rope_theta"] == PUBLIC_A2_7B["rope_theta"]
    assert set(written) - set(PUBLIC_A2_7B) <= {
        "use_cache",
        "dtype",
        "rope_parameters",
        "qkv_bias",
        "transformers_version",
    }
    # transformers builds exactly the parameters we count (meta device: no memory)
    with torch.device("meta"):
        hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**written))
    assert sum(p.numel() for p in hf.parameters()) == n["total"]


def test_copy_forces_its_fields():
    moe, forced = plan_config(
        qwen1_5_1_8b(), MoEShape(num_experts=8, num_experts_per_tok=2), UpcycleConfig(strategy="copy")
    )
    assert forced == {
        "moe_intermediate_size": [1408, 5504],
        "shared_expert_intermediate_size": [5632, 0],
        "norm_topk_prob": [False, True],
    }
    assert (moe.moe_intermediate_size, moe.shared_expert_intermediate_size, moe.norm_topk_prob) == (
        5504,
        0,
        True,
    )


def test_dense_layers_keep_the_source_width():
    moe, _ = plan_config(
        qwen1_5_1_8b(), MoEShape(mlp_only_layers=[0], intermediate_size=None), UpcycleConfig()
    )
    assert moe.intermediate_size == 5504 and moe.moe_layers == list(range(1, 24))


def write_header_only(directory: Path, cfg: ModelConfig, **config_changes) -> None:
    """A bf16 checkpoint with real headers and a sparse (unallocated) data section."""
    directory.mkdir()
    header, offset = {}, 0
    for key, shape in expected_hf_shapes(cfg).items():
        end = offset + math.prod(shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    config = hf_config_dict(cfg, torch.bfloat16) | config_changes
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "context, want",
    [
        ({}, (8192, 21)),  # the A2.7B preset: the public file's values
        (dict(max_position_embeddings=None, max_window_layers=None), (32768, 20)),  # the source's
        (dict(max_position_embeddings=4096, max_window_layers=0), (4096, 0)),
    ],
)
def test_context_length_is_chosen(context, want, tmp_path):
    source = tmp_path / "src"
    write_header_only(source, qwen1_5_1_8b().replace(max_position_embeddings=32768), max_window_layers=20)
    plan = make_plan(source, tmp_path / "out", MoEShape(**context), UpcycleConfig())
    written = plan.config_json()
    assert (written["max_position_embeddings"], written["max_window_layers"]) == want
    assert (plan.to_dict()["max_position_embeddings"], plan.to_dict()["max_window_layers"]) == want
    assert (
        f"max_position_embeddings {want[0]}, max_window_layers {want[1]} (source: 32768, 20)" in plan.format()
    )


def test_dry_run_of_the_full_size_recipe_writes_nothing(tmp_path, capsys):
    write_header_only(tmp_path / "qwen1.5-1.8b", qwen1_5_1_8b())
    out = tmp_path / "out"
    report = upcycle(tmp_path / "qwen1.5-1.8b", out, cfg=UpcycleConfig(dry_run=True), verbose=True)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["qwen1.5-1.8b"]
    plan = report["plan"]
    assert plan["bytes_to_write"] == PUBLIC_TOTAL_SIZE
    assert plan["dtype"] == "bfloat16"
    assert plan["strategy_plan"]["replicas"] == 17
    assert plan["strategy_plan"]["reinit_per_expert"] == 704
    text = capsys.readouterr().out
    assert "60 routed x 1408, top-4" in text and "total 14.316B" in text and "28.63 GB" in text


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_experts=0), "moe.num_experts must be positive"),
        (dict(num_experts_per_tok=61), "moe.num_experts_per_tok=61 must be <= moe.num_experts=60"),
        (dict(shared_expert_intermediate_size=-1), "moe.shared_expert_intermediate_size must be >= 0"),
        (dict(mlp_only_layers=[24]), "moe.mlp_only_layers holds 24"),
        (dict(mlp_only_layers=list(range(24))), "no layer would become MoE"),
        (dict(max_position_embeddings=0), "moe.max_position_embeddings must be positive or null"),
        (dict(max_window_layers=-1), "moe.max_window_layers must be >= 0 or null"),
    ],
)
def test_bad_moe_shapes_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        plan_config(qwen1_5_1_8b(), MoEShape(**fields), UpcycleConfig())


@pytest.mark.parametrize(
    "strategy, fields, recipe, message",
    [
        ("split", {}, {}, "set moe.shared_expert_intermediate_size=0"),
        (
            "split",
            dict(shared_expert_intermediate_size=0),
            {},
            r"moe.num_experts x moe.moe_intermediate_size must equal the source's intermediate_size, got 60 x 1408",
        ),
        (
            "granular",
            {},
            {},
            "moe.shared_expert_intermediate_size=5632 must be < the source's intermediate_size=5504",
        ),
        (
            "granular",
            dict(shared_expert_intermediate_size=0, num_experts=62),
            {},
            r"moe.num_experts=62 must be a multiple of G .* = 4",
        ),
        (
            "granular",
            dict(shared_expert_intermediate_size=0),
            dict(granular_exact=True),
            "set moe.norm_topk_prob=true",
        ),
        (
            "granular",
            dict(shared_expert_intermediate_size=0, norm_topk_prob=True, num_experts_per_tok=6),
            dict(granular_exact=True),
            "moe.num_experts_per_tok=6 to be a multiple of G = 4",
        ),
        (
            "granular",
            dict(shared_expert_intermediate_size=0, norm_topk_prob=True),
            dict(granular_exact=True, router_init="zeros"),
            "needs router rows that differ between virtual groups",
        ),
    ],
)
def test_unrealisable_shapes_name_the_fields_and_rule(strategy, fields, recipe, message):
    with pytest.raises(ValueError, match=message):
        plan_config(qwen1_5_1_8b(), MoEShape(**fields), UpcycleConfig(strategy=strategy, **recipe))


@pytest.mark.parametrize(
    "recipe, message",
    [
        (dict(strategy="moefication"), "upcycle.strategy='moefication' is unknown"),
        (dict(split_method="kmeans"), "upcycle.split_method='kmeans' is unknown"),
        (dict(reinit_fraction=1.5), r"upcycle.reinit_fraction must be in \[0, 1\]"),
        (dict(router_init_std=-1.0), "upcycle.router_init_std must be >= 0"),
        (dict(router_init="orthogonal"), "upcycle.router_init='orthogonal' is unknown"),
        (dict(reinit_indices="per_row"), "upcycle.reinit_indices='per_row' is unknown"),
        (
            dict(strategy="granular", reinit_fraction=0.5),
            "upcycle.reinit_fraction is used by strategies copy and finegrained, not granular",
        ),
        (
            dict(strategy="split", router_init="centroids"),
            "router_init=centroids uses the balanced k-means centroids of upcycle.strategy=split with "
            "upcycle.split_method=clustering",
        ),
        (dict(dtype="int8"), "upcycle.dtype='int8' is unknown"),
        (dict(max_shard_bytes=0), "upcycle.max_shard_bytes must be positive"),
        (dict(split_score_scale=0.0), "upcycle.split_score_scale must be positive"),
        (dict(split_gating="noisy"), "upcycle.split_gating='noisy' is unknown"),
    ],
)
def test_bad_recipes_name_the_field(recipe, message):
    with pytest.raises(ValueError, match=message):
        UpcycleConfig(**recipe).validate()


def test_unknown_moe_field_is_refused():
    with pytest.raises(ValueError, match=r"moe: unknown field\(s\) \['hidden_size'\]"):
        MoEShape.from_mapping({"hidden_size": 4096})


def test_expert_widths_grouped_gemms_cannot_run_are_a_warning_in_the_plan(tmp_path, capsys):
    """split of Qwen1.5-1.8B's FFN (5504) into 32 experts gives 172-wide experts: a valid checkpoint
    that bf16 training refuses at start-up (grouped GEMMs need multiples of 8). The plan says so, with
    the widths that work, before anything is written (before: nothing until training started)."""
    write_header_only(tmp_path / "src", qwen1_5_1_8b())
    shape = MoEShape(num_experts=32, moe_intermediate_size=172, shared_expert_intermediate_size=0)
    recipe = UpcycleConfig(strategy="split", dry_run=True)
    report = upcycle(tmp_path / "src", tmp_path / "out", shape, recipe, verbose=True)
    (warning,) = report["plan"]["warnings"]
    assert warning == (
        "moe.moe_intermediate_size=172 is not a multiple of 8: grouped GEMMs cannot run the routed experts "
        "in bfloat16, so training in bfloat16 will refuse this model (fp32 training works); nearest "
        "multiples of 8: 168, 176; widths that split the source's FFN 5504 evenly: 128 (43 experts), "
        "344 (16 experts)"
    )
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(maxsplit=1) for line in printed if line.startswith("warning")] == [
        ["warning", warning]
    ]
    upcycle(tmp_path / "src", tmp_path / "out", shape, recipe, verbose=False)
    assert capsys.readouterr().err == f"warning: {warning}\n"
    assert not (tmp_path / "out").exists()
    # 64 experts: 86 wide, not even a multiple of 4 (fp32); the default recipe's 1408: no warning
    shape = MoEShape(num_experts=64, moe_intermediate_size=86, shared_expert_intermediate_size=0)
    (warning,) = make_plan(tmp_path / "src", tmp_path / "out", shape, recipe).warnings
    assert warning.startswith("moe.moe_intermediate_size=86 is not a multiple of 8: grouped GEMMs cannot ")
    assert "in bfloat16 and float32, so training in bfloat16 and float32 will refuse this model; " in warning
    assert make_plan(tmp_path / "src", tmp_path / "out", MoEShape(), UpcycleConfig()).warnings == []
