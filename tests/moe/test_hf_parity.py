"""Parity with transformers' Qwen2 / Qwen2-MoE, both directions (reference.md section 2)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe.hf import from_pretrained, save_pretrained
from tests.moe.hf_fixtures import CASES, VOCAB, make_hf_model, write_public_layout

TOL = dict(rtol=0, atol=1e-5)


def _ids(batch=2, seq=17, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["save_pretrained", "public_per_expert", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(case, layout, tmp_path):
    if layout != "save_pretrained" and not case.startswith("moe"):
        pytest.skip("expert layouts only differ for MoE models")
    ref = make_hf_model(case)
    if layout == "save_pretrained":
        ref.save_pretrained(tmp_path)
    elif layout == "fused":
        ref.save_pretrained(tmp_path, save_original_format=False)
    else:
        write_public_layout(ref, tmp_path)
    ours = from_pretrained(tmp_path, expert_backend="torch").eval()
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids), ours(ids)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    if case.startswith("moe"):
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=1e-7)
        assert len(got.routers) == len(ours.config.moe_layers)


@pytest.mark.parametrize(
    "case", ["dense_gqa", "dense_tied", "moe_shared", "moe_no_shared", "moe_mixed_layers"]
)
def test_export_loads_in_transformers(case, tmp_path):
    ref = make_hf_model(case)
    ref.save_pretrained(tmp_path / "src")
    ours = from_pretrained(tmp_path / "src", expert_backend="torch").eval()
    save_pretrained(ours, tmp_path / "out", dtype="float32", max_shard_bytes=40_000)  # forces several shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back) is type(ref)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, **TOL)
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, **TOL)


def test_export_uses_public_keys_and_4x_config_fields(tmp_path):
    ref = make_hf_model("moe_shared")
    ref.save_pretrained(tmp_path / "src")
    save_pretrained(from_pretrained(tmp_path / "src"), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    # transformers 4.x reads the top-level fields and silently uses theta=10000 without them
    assert cfg["rope_theta"] == 10000.0 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["model_type"] == "qwen2_moe"
    keys = set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.2.mlp.shared_expert_gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_padding_mask_matches_transformers(tmp_path):
    ref = make_hf_model("moe_shared")
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, expert_backend="torch").eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # right padding
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], **TOL)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["moe_norm_topk", "moe_shared"])
def test_total_loss_matches_transformers(case, tmp_path):
    """finemoe's training loss (CE + router_aux_loss_coef x aux, z-loss off as in transformers) equals
    transformers' `loss` with `output_router_logits=True`. transformers shifts `labels` inside and
    balances over every position; ours takes aligned targets, so the last position's target is -100."""
    ref = make_hf_model(case)
    assert ref.config.router_aux_loss_coef > 0
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, expert_backend="torch", router_z_loss_coef=0.0).eval()
    ids = _ids(seq=18)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        want = ref(ids, labels=ids, output_router_logits=True)
        got = ours(ids, targets=targets)
    assert got.loss is not None and got.aux_loss is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=1e-7)
    # the aux term is visible at this tolerance: a loss without it would fail
    assert (ref.config.router_aux_loss_coef * want.aux_loss).abs() > 1e-4


def test_import_reads_the_routers_selection_bias(tmp_path):
    """An export of a run with aux-loss-free balancing carries `mlp.gate.e_score_correction_bias`;
    `init_from` such an export restores the bias (transformers itself ignores the key)."""
    from safetensors.torch import load_file, save_file

    ref = make_hf_model("moe_shared")
    ref.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    bias = torch.linspace(-0.5, 0.5, ref.config.num_experts)
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = bias
    save_file(tensors, path, metadata={"format": "pt"})
    ours = from_pretrained(tmp_path, expert_backend="torch")
    router = ours.model.layers[1].mlp.gate
    assert torch.equal(router.selection_bias, bias) and router.use_selection_bias
    assert not ours.model.layers[0].mlp.gate.use_selection_bias


def test_save_pretrained_round_trips_the_selection_biases(tmp_path):
    """save_pretrained writes the routers' selection biases, in fp32 whatever the dtype, and
    from_pretrained routes exactly as the saved model did (before: not written, reloaded as zeros).
    Layer 1's router weight is zero, so its biases alone choose the experts: steps of 1e-4 around
    1.0, which bf16 would round to one value (a tie) and route differently."""
    from safetensors import safe_open

    ref = make_hf_model("moe_shared")
    ref.save_pretrained(tmp_path / "src")
    ours = from_pretrained(tmp_path / "src", expert_backend="torch").eval()
    routers = [layer.mlp.gate for layer in ours.model.layers]
    num_experts = routers[0].selection_bias.numel()
    with torch.no_grad():
        for p in ours.parameters():  # bf16-representable: the bf16 save loses nothing else
            p.copy_(p.bfloat16().float())
        routers[1].weight.zero_()
        routers[1].selection_bias.copy_(
            1.0 + 1e-4 * torch.randperm(num_experts, generator=torch.Generator().manual_seed(3))
        )
        routers[2].selection_bias.copy_(
            0.3 * torch.randn(num_experts, generator=torch.Generator().manual_seed(4))
        )
    for r in routers[1:]:
        r.use_selection_bias = True
    assert routers[1].selection_bias.bfloat16().unique().numel() == 1  # bf16 would tie every expert
    save_pretrained(ours, tmp_path / "out", dtype="bfloat16")
    back = from_pretrained(tmp_path / "out", expert_backend="torch").eval()
    (shard,) = (tmp_path / "out").glob("*.safetensors")
    with safe_open(shard, framework="pt") as f:
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        stored = list(f.keys())
        assert "model.layers.0.mlp.gate.e_score_correction_bias" not in stored  # zero: a no-op
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(5))
    for mine, theirs in zip(routers, (layer.mlp.gate for layer in back.model.layers)):
        assert torch.equal(theirs.selection_bias, mine.selection_bias)
        assert theirs.use_selection_bias == mine.use_selection_bias
        want, got = mine(x), theirs(x)
        assert torch.equal(got.experts_TK, want.experts_TK) and torch.equal(got.weights_TK, want.weights_TK)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=0)
