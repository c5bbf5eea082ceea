"""Bad checkpoints are refused with an error naming the file, key and shapes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.hf import from_pretrained, read_config, save_pretrained
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


def _sharded(moe_dir, tmp_path):
    """`moe_dir` re-saved by our writer in several shards; returns the directory and its index path."""
    out = tmp_path / "sharded"
    save_pretrained(from_pretrained(moe_dir), out, dtype="float32", max_shard_bytes=40_000)
    return out, out / "model.safetensors.index.json"


def test_index_mapping_a_key_to_the_wrong_shard_names_index_shard_and_key(moe_dir, tmp_path):
    """Before: safetensors' own SafetensorError (not a user error: the CLIs printed a traceback)."""
    out, index = _sharded(moe_dir, tmp_path)
    data = json.loads(index.read_text())
    key = "model.layers.2.self_attn.k_proj.bias"
    other = next(f for f in sorted(set(data["weight_map"].values())) if f != data["weight_map"][key])
    data["weight_map"][key] = other
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"index.json maps '{key}' to .*{other}, which does not hold it"):
        from_pretrained(out)


@pytest.mark.parametrize("text", ['{"weight_map": {"a": ', "[1, 2]", b"\xff\xfe"])
def test_malformed_index_names_the_file(moe_dir, tmp_path, text):
    out, index = _sharded(moe_dir, tmp_path)
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not a valid index"):
        from_pretrained(out)


def test_output_that_is_a_plain_file_is_refused(moe_dir, tmp_path):
    model = from_pretrained(moe_dir)
    target = tmp_path / "model"
    target.write_text("not a directory")
    for overwrite in (False, True):  # before: iterdir's NotADirectoryError, or with overwrite a half move
        with pytest.raises(ValueError, match=f"output {target} exists and is not a directory"):
            save_pretrained(model, target, overwrite=overwrite)
        assert target.read_text() == "not a directory"
    with pytest.raises(ValueError, match=f"output {target / 'sub'}: {target} exists and is not a directory"):
        save_pretrained(model, target / "sub")
    assert not list(tmp_path.glob(".model*"))  # no temporary directory left


def test_invalid_config_values_name_the_config_file(moe_dir):
    cfg = json.loads((moe_dir / "config.json").read_text())
    (moe_dir / "config.json").write_text(json.dumps(cfg | {"num_attention_heads": 0}))
    with pytest.raises(
        ValueError, match=rf"^{moe_dir}/config.json: model.num_attention_heads must be positive"
    ):
        read_config(moe_dir)
