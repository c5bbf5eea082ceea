"""Export of hand-written checkpoints (no training run): selection biases, the tokenizer of any branch,
and input errors that name the file. The checkpoints use the format-1 layout (`ep0/` with `<param>::fp32`
keys), which `StateReader` still reads and which needs no process group to write."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe.config import ModelConfig
from moe.hf import from_pretrained
from moe.model import Qwen2MoEForCausalLM
from train.checkpoint import state_key
from train.export import export, run_dir_of

CFG = ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_experts=8, expert_backend="torch")


def tiny_model(seed: int = 0) -> Qwen2MoEForCausalLM:
    """A random tiny MoE whose weights are bf16-representable (a bf16 export loses nothing), with
    selection biases that bf16 would round: layer 0's router is zero, so its biases alone route."""
    torch.manual_seed(seed)
    model = Qwen2MoEForCausalLM(CFG)
    model.init_weights()
    routers = [layer.mlp.gate for layer in model.model.layers]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
        routers[0].weight.zero_()
        routers[0].selection_bias.copy_(1.0 + 1e-4 * torch.randperm(CFG.num_experts))  # all 1.0 in bf16
        routers[1].selection_bias.copy_(0.3 * torch.randn(CFG.num_experts))
    for r in routers:
        r.use_selection_bias = True
    return model.eval()


def write_checkpoint(model: Qwen2MoEForCausalLM, ckpt: Path, **model_config) -> Path:
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors |= {state_key(name, "fp32", e): p[e].detach().clone() for e in range(p.shape[0])}
        else:
            tensors[state_key(name, "fp32")] = p.detach().clone()
    (ckpt / "ep0").mkdir(parents=True)
    save_file(tensors, ckpt / "ep0" / "model.safetensors")
    biases = {
        f"{n}.selection_bias": m.selection_bias
        for n, m in model.named_modules()
        if hasattr(m, "selection_bias")
    }
    save_file(biases, ckpt / "buffers.safetensors")
    fields = json.loads(json.dumps(dataclasses.asdict(model.config))) | model_config
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "model_config": fields}))
    return ckpt


def test_selection_biases_are_exported_in_fp32_and_route_as_in_training(tmp_path):
    """A bf16 export keeps the biases fp32 (before: 1.0001..1.0007 all became 1.0, a tie), and our
    from_pretrained reloads them: same biases, same routing, same logits."""
    model = tiny_model()
    ckpt = write_checkpoint(model, tmp_path / "run" / "checkpoints" / "step_00000001")
    export(ckpt, tmp_path / "hf", dtype="bfloat16")
    (shard,) = (tmp_path / "hf").glob("*.safetensors")
    with safe_open(shard, framework="pt") as f:
        assert f.get_slice("model.layers.0.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.mlp.gate.weight").get_dtype() == "BF16"
    back = from_pretrained(tmp_path / "hf", expert_backend="torch").eval()
    x = torch.randn(41, CFG.hidden_size)
    for layer, theirs in zip(model.model.layers, back.model.layers):
        mine, got = layer.mlp.gate, theirs.mlp.gate
        assert torch.equal(got.selection_bias, mine.selection_bias) and got.use_selection_bias
        want_route, got_route = mine(x), got(x)
        assert torch.equal(got_route.experts_TK, want_route.experts_TK)
        assert torch.equal(got_route.weights_TK, want_route.weights_TK)
    ids = torch.randint(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def _tokenizer(run: Path) -> None:
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 128}')


@pytest.mark.parametrize(
    "where",
    [
        "checkpoints/step_00000001",
        # a rollback's abandoned branch (train/checkpoint_branches.py): before, the tokenizer was looked
        # up in checkpoints/abandoned/ and the export silently shipped none
        "checkpoints/abandoned/20260101T000000_step_00000002_from_scratch/step_00000001",
    ],
)
def test_the_tokenizer_of_the_run_is_shipped_from_any_branch(tmp_path, where, capsys):
    run = tmp_path / "run"
    _tokenizer(run)
    ckpt = write_checkpoint(tiny_model(), run / where)
    assert run_dir_of(ckpt) == run.resolve()
    report = export(ckpt, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert report["tokenizer"] == str(run.resolve() / "tokenizer")
    assert "warning" not in capsys.readouterr().err


def test_a_missing_tokenizer_is_reported(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = write_checkpoint(tiny_model(), run / "checkpoints" / "step_00000001")
    assert export(ckpt, tmp_path / "hf")["tokenizer"] is None
    err = capsys.readouterr().err
    assert f"warning: {run.resolve() / 'tokenizer'} holds no tokenizer files" in err
    loose = write_checkpoint(tiny_model(), tmp_path / "copied" / "step_00000001")  # outside any run
    assert run_dir_of(loose) is None
    export(loose, tmp_path / "hf2")
    assert (
        "is not inside a run's checkpoints/ directory: the export ships no tokenizer"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        (
            {"num_expert": 8},
            r"meta.json: model_config has keys that ModelConfig does not know: \['num_expert'\]",
        ),
        ({"num_attention_heads": 0}, r"meta.json: model.num_attention_heads must be positive"),
    ],
)
def test_bad_model_config_in_meta_json_names_file_and_key(tmp_path, model_config, message):
    """Before: TypeError from ModelConfig(**...) (a traceback from the CLI)."""
    ckpt = write_checkpoint(tiny_model(), tmp_path / "run" / "checkpoints" / "step_00000001", **model_config)
    with pytest.raises(ValueError, match=f"^{ckpt}/{message}"):
        export(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_output_that_is_a_plain_file_is_refused_before_reading(tmp_path):
    ckpt = write_checkpoint(tiny_model(), tmp_path / "run" / "checkpoints" / "step_00000001")
    out = tmp_path / "hf"
    out.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=f"output {out} exists and is not a directory"):
            export(ckpt, out, overwrite=overwrite)
    assert out.read_text() == "keep me"


def test_cli_reports_a_bad_meta_json_as_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """The `cli` path: a ValueError becomes `finemoe-export: error: <one line>`, status 2, no traceback."""
    ckpt = write_checkpoint(tiny_model(), tmp_path / "run" / "checkpoints" / "step_00000001", hidden_sise=64)
    monkeypatch.chdir(tmp_path)
    for var in ("FINEMOE_DEBUG", "HYDRA_FULL_ERROR", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.export", f"checkpoint={ckpt}", "output=hf"])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module("train.export").main()
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "Traceback" not in out + err
    assert err.strip().splitlines() == [
        f"finemoe-export: error: {ckpt}/meta.json: model_config has keys that ModelConfig does not know: "
        "['hidden_sise'] (a checkpoint written by another version of finemoe?)"
    ]
