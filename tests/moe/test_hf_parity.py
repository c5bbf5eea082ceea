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


def test_loss_matches_transformers(tmp_path):
    """Our aligned-targets loss == transformers' shifted-labels loss (CE + coef * aux)."""
    ref = make_hf_model("moe_norm_topk")
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, expert_backend="torch").eval()
    ids = _ids(seq=18)
    with torch.no_grad():
        want = ref(ids, labels=ids)
        got = ours(ids[:, :-1], targets=ids[:, 1:])
        want_short = ref(ids[:, :-1])
    ce = torch.nn.functional.cross_entropy(want_short.logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(got.ce_loss, ce, rtol=1e-6, atol=1e-6)
    # transformers adds coef * aux of the full sequence; compare the CE parts term by term
    torch.testing.assert_close(
        want.loss - ref.config.router_aux_loss_coef * want.aux_loss,
        torch.nn.functional.cross_entropy(want.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)),
        rtol=1e-6,
        atol=1e-6,
    )
