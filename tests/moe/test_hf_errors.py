"""Bad checkpoints are refused with an error naming the file, key and shapes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.hf import from_pretrained, read_config
from tests.moe.hf_fixtures import make_hf_model


@pytest.fixture()
def moe_dir(tmp_path):
    make_hf_model("moe_shared").save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(directory, fn):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_shape_mismatch_names_key_and_shapes(moe_dir):
    _edit_weights(
        moe_dir, lambda t: t.__setitem__("model.layers.1.mlp.experts.3.up_proj.weight", torch.zeros(25, 64))
    )
    with pytest.raises(
        ValueError,
        match=r"'model.layers.1.mlp.experts.3.up_proj.weight' has shape \[25, 64\] "
        r"but the config implies \[24, 64\]",
    ):
        from_pretrained(moe_dir)


def test_missing_key(moe_dir):
    _edit_weights(moe_dir, lambda t: t.pop("model.layers.2.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match="key 'model.layers.2.self_attn.k_proj.bias' is missing"):
        from_pretrained(moe_dir)


def test_unexpected_key(moe_dir):
    _edit_weights(
        moe_dir, lambda t: t.__setitem__("model.layers.0.mlp.experts.8.up_proj.weight", torch.zeros(24, 64))
    )
    with pytest.raises(ValueError, match="unexpected keys.*experts.8.up_proj"):
        from_pretrained(moe_dir)


def test_non_qwen2_architecture(moe_dir):
    cfg = json.loads((moe_dir / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mixtral", ["MixtralForCausalLM"]
    (moe_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: model_type='mixtral'.*is not a Qwen2"):
        read_config(moe_dir)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_config(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"config.json is missing"):
        read_config(tmp_path)
    make_hf_model("dense_gqa").config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has neither model.safetensors nor model.safetensors.index.json"):
        from_pretrained(tmp_path)


def test_corrupt_safetensors(moe_dir):
    (moe_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(moe_dir)
