"""ModelConfig validation, parameter accounting and the presets."""

import subprocess
import sys

import pytest
import torch

from moe.config import ModelConfig
from moe.model import Qwen2MoEForCausalLM
from moe.params import PRESET_DIR, format_table, load_preset


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_experts_per_tok=9), r"num_experts_per_tok=9 must be in \[1, model.num_experts=8\]"),
        (
            dict(hidden_size=66, num_attention_heads=4),
            "num_attention_heads=4 must divide model.hidden_size=66",
        ),
        (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide model.num_attention_heads=4"),
        (dict(hidden_size=0), "hidden_size must be positive"),
        (dict(moe_intermediate_size=-1), "moe_intermediate_size must be positive"),
        (dict(num_experts=0, intermediate_size=0), "intermediate_size must be positive"),
        (dict(vocab_size=-5), "vocab_size must be positive"),
        (dict(expert_backend="cuda"), "expert_backend='cuda' is unknown"),
        (dict(mlp_only_layers=[7]), "mlp_only_layers holds 7"),
        (dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef must be >= 0"),
    ],
)
def test_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes).validate()


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
@pytest.mark.parametrize("mixed", [False, True])
def test_num_params_matches_built_module(name, mixed):
    cfg = load_preset(name)
    if mixed and cfg.is_moe:
        cfg = cfg.replace(mlp_only_layers=[0], decoder_sparse_step=1, tie_word_embeddings=False)
    model = Qwen2MoEForCausalLM(cfg)
    counts = cfg.num_params()
    assert counts["total"] == model.num_params()
    if cfg.is_moe:  # activated: subtract the routed experts a token does not visit
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        unused = len(cfg.moe_layers) * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
        assert counts["activated"] == model.num_params() - unused


def test_num_params_on_meta_device_for_full_size():
    cfg = load_preset("qwen1_5_moe_a2_7b")
    with torch.device("meta"):
        model = Qwen2MoEForCausalLM(cfg)
    assert model.num_params() == cfg.num_params()["total"]


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("qwen1_5_moe_a2_7b", (14.3, 2.7, 2.0)),
        ("qwen1_5_7b", (7.7, 7.7, 6.4)),
        ("qwen1_5_1_8b", (1.8, 1.8, 1.2)),
    ],
)
def test_presets_match_published_counts(name, published):
    n = load_preset(name).num_params()
    got = (n["total"] / 1e9, n["activated"] / 1e9, n["activated_non_embedding"] / 1e9)
    for g, p in zip(got, published):
        assert abs(g - p) <= 0.1, (name, got, published)


def test_params_cli_last_line_and_overrides():
    root = PRESET_DIR.parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "moe.params", "model=qwen1_5_moe_a2_7b", "model.num_experts=30"],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    ).stdout
    want = format_table(load_preset("qwen1_5_moe_a2_7b").replace(num_experts=30)).splitlines()[-1]
    assert out.strip().splitlines()[-1] == want
    fewer = (
        load_preset("qwen1_5_moe_a2_7b").num_params()["total"] - 30 * 24 * 3 * 2048 * 1408
    )  # 30 experts removed
    assert want.startswith(f"total {fewer / 1e9:.2f}B activated 2.69B activated_non_embedding 2.07B")


def test_hf_roundtrip_of_config():
    cfg = load_preset("qwen1_5_moe_a2_7b")
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(router_z_loss_coef=0.0)


def test_from_hf_dict_rejects_other_architectures():
    with pytest.raises(ValueError, match=r"model_type='llama' .*is not a Qwen2"):
        ModelConfig.from_hf_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="required key 'hidden_size' is missing"):
        ModelConfig.from_hf_dict({"model_type": "qwen2", "vocab_size": 10})


def test_inert_sliding_window_fields_round_trip_through_training_meta():
    """config.json's sliding_window / max_window_layers (inert: no sliding-window attention) survive
    config.json -> ModelConfig -> meta.json's asdict -> export's ModelConfig -> config.json; absent,
    they are written as transformers' defaults (max_position_embeddings, the layer count)."""
    import dataclasses

    public = ModelConfig(num_hidden_layers=4, max_position_embeddings=8192).to_hf_dict()
    public |= {"sliding_window": 32768, "max_window_layers": 3}
    loaded = ModelConfig.from_hf_dict(public)
    exported = ModelConfig(**dataclasses.asdict(loaded)).to_hf_dict()
    assert (exported["sliding_window"], exported["max_window_layers"]) == (32768, 3)
    plain = ModelConfig(num_hidden_layers=4, max_position_embeddings=8192).to_hf_dict()
    assert (plain["sliding_window"], plain["max_window_layers"]) == (8192, 4)


# ---- config.json semantics: what transformers builds from the same file ---------------------------

_SIZES = {  # the keys that size a model (required): transformers' own defaults, so nothing else differs
    "qwen2": dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32),
    "qwen2_moe": dict(
        vocab_size=151936,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_experts=60,
        moe_intermediate_size=1408,
    ),
}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_moe"])
def test_missing_keys_take_transformers_defaults(model_type):
    """Every key that config.json leaves out gets the value transformers gives it for the same file
    (before: our tiny test defaults, e.g. rope_theta 1e6 and top-2 of 8 experts)."""
    from transformers import Qwen2Config, Qwen2MoeConfig

    from moe.config import ARCH_FIELDS, MOE_FIELDS

    d = {"model_type": model_type, **_SIZES[model_type]}
    ours = ModelConfig.from_hf_dict(dict(d))
    hf = (Qwen2MoeConfig if model_type == "qwen2_moe" else Qwen2Config).from_dict(dict(d))
    fields = ARCH_FIELDS + (MOE_FIELDS if model_type == "qwen2_moe" else ())
    want = {f: getattr(hf, f) for f in fields if f != "rope_theta"}
    want["rope_theta"] = hf.rope_parameters["rope_theta"]
    assert {f: getattr(ours, f) for f in fields} == want
    assert ours.is_moe == (model_type == "qwen2_moe")


def test_null_rope_theta_reads_rope_parameters():
    """transformers 5.x writes `"rope_theta": null` beside `rope_parameters` in some files."""
    d = ModelConfig().to_hf_dict() | {"rope_theta": None, "rope_parameters": {"rope_theta": 5e5}}
    assert ModelConfig.from_hf_dict(d).rope_theta == 5e5
    del d["rope_parameters"]
    assert ModelConfig.from_hf_dict(d).rope_theta == 10000.0  # transformers' default
    d = ModelConfig().to_hf_dict() | {"rope_theta": 1e6, "rope_parameters": {"rope_theta": 5e5}}
    with pytest.raises(ValueError, match=r"config.json: rope_parameters.rope_theta=500000.0, rope_theta="):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        (  # legacy spelling of older configs: `type`, not `rope_type` (before: silently plain RoPE)
            {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
            "rope_scaling.type='yarn' is not supported",
        ),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_parameters.rope_type='yarn'"),
        (
            {"rope_parameters": {"rope_type": "default"}, "rope_scaling": {"type": "dynamic"}},
            "rope_scaling.type='dynamic'",
        ),
    ],
)
def test_rope_scaling_is_refused_naming_file_and_key(rope, message):
    d = {k: v for k, v in ModelConfig().to_hf_dict().items() if k != "rope_parameters"} | rope
    with pytest.raises(ValueError, match=f"^/ckpt/config.json: {message}"):
        ModelConfig.from_hf_dict(d, source="/ckpt/config.json")
    plain = d | {"rope_scaling": {"type": "default"}, "rope_parameters": {"rope_type": "default"}}
    assert ModelConfig.from_hf_dict(plain).rope_theta == 1e6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"num_attention_heads": 0}, "model.num_attention_heads must be positive"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide"),
        ({"hidden_size": "64"}, "hidden_size='64' has the wrong type"),
        ({"norm_topk_prob": 1}, "norm_topk_prob=1 has the wrong type"),
        ({"mlp_only_layers": [0.5]}, r"mlp_only_layers=\[0.5\] has the wrong type"),
    ],
)
def test_bad_config_json_values_name_the_file(changes, message):
    d = ModelConfig().to_hf_dict() | changes
    with pytest.raises(ValueError, match=f"^/ckpt/config.json: .*{message}"):
        ModelConfig.from_hf_dict(d, source="/ckpt/config.json")


def test_missing_num_key_value_heads_is_transformers_default():
    """Absent: 32 (qwen2) / 16 (qwen2_moe) as in transformers, not the query heads; null: the query heads."""
    d = {"model_type": "qwen2", **_SIZES["qwen2"], "num_attention_heads": 64}
    assert ModelConfig.from_hf_dict(d).num_key_value_heads == 32
    assert ModelConfig.from_hf_dict(d | {"num_key_value_heads": None}).num_key_value_heads == 64
