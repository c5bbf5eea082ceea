"""Bad input is refused before anything is written; an interrupted run leaves nothing that looks done."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import upcycle.run as upcycle_run
from tests.upcycle.fixtures import make_dense
from upcycle import MoEShape, UpcycleConfig, upcycle

TINY = MoEShape(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=0
)
COPY = UpcycleConfig(strategy="copy", progress=False)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    make_dense(d)
    return d


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(cfg | changes))


def _broken_sources():
    """name -> (function breaking a copy of the dense checkpoint, expected message)."""

    def no_config(d):
        (d / "config.json").unlink()

    def no_weights(d):
        (d / "model.safetensors").unlink()

    def llama(d):
        _edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"])

    def already_moe(d):
        _edit_config(d, model_type="qwen2_moe", num_experts=8, moe_intermediate_size=32)

    def config_disagrees(d):
        _edit_config(d, intermediate_size=128)

    def missing_tensor(d):
        t = load_file(d / "model.safetensors")
        del t["model.layers.1.self_attn.k_proj.bias"]
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    def extra_tensor(d):
        t = load_file(d / "model.safetensors")
        t["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    def quantized(d):
        t = load_file(d / "model.safetensors")
        t["model.layers.0.mlp.gate_proj.weight"] = t["model.layers.0.mlp.gate_proj.weight"].to(torch.int8)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})

    return {
        "no_config": (no_config, "config.json is missing"),
        "no_weights": (no_weights, "has neither model.safetensors nor model.safetensors.index.json"),
        "llama": (llama, "model_type='llama'.*is not a Qwen2"),
        "already_moe": (already_moe, "is already a Qwen2-MoE model"),
        "config_disagrees": (
            config_disagrees,
            r"'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\] but the config implies \[128, 64\]",
        ),
        "missing_tensor": (missing_tensor, "'model.layers.1.self_attn.k_proj.bias' is missing"),
        "extra_tensor": (extra_tensor, r"does not have: \['model.layers.0.mlp.extra.weight'\]"),
        "quantized": (quantized, "is stored as I8; only float checkpoints"),
    }


@pytest.mark.parametrize("case", list(_broken_sources()))
def test_broken_sources_are_refused_before_writing(case, dense_dir, tmp_path):
    breaker, message = _broken_sources()[case]
    src = tmp_path / "src"
    shutil.copytree(dense_dir, src)
    breaker(src)
    with pytest.raises(ValueError, match=message):
        upcycle(src, tmp_path / "out", TINY, COPY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_missing_source(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        upcycle(tmp_path / "nowhere", tmp_path / "out", TINY, COPY)


def test_non_empty_output_needs_overwrite(dense_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty .*upcycle.overwrite=true"):
        upcycle(dense_dir, out, TINY, COPY)
    assert (out / "keep.txt").read_text() == "mine"
    upcycle(dense_dir, out, TINY, COPY.replace(overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old directory left


def test_output_cannot_be_the_source(dense_dir):
    with pytest.raises(ValueError, match="is the source directory"):
        upcycle(dense_dir, dense_dir, TINY, COPY.replace(overwrite=True))


def test_interrupted_run_leaves_no_checkpoint(dense_dir, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        yield "model.layers.0.mlp.gate.weight", torch.zeros(4, 64)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(upcycle_run, "moe_layer_tensors", failing)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="disk on fire"):
        upcycle(dense_dir, tmp_path / "out", TINY, COPY)
    assert list(tmp_path.iterdir()) == []
    assert torch.get_num_threads() == threads  # the run sets 1 intra-op thread and restores it
