"""Aux-loss-free balancing (`moe.bias_update_rate`): the router's selection bias and its update.

- Units: the bias is added to the router logits, so one rate balances a skewed router whatever
  the number of experts. On softmax probabilities (the earlier design) a step acts about E times
  harder (probabilities spread over tokens ~1/E as much as logits): at this rate the load then
  cycles instead of settling (measured: between 1.1 and 2.2 at 8 experts, up to 9.2 at 64).
- Through the trainer (one run, 3 launches): a router skewed towards a few experts is brought
  towards balance without the aux loss; a stop_at_step + resume run ends with bit-identical biases;
  export writes them as `mlp.gate.e_score_correction_bias` (transformers' Qwen2-MoE ignores it).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moe.config import ModelConfig
from moe.hf import save_pretrained
from moe.model import Qwen2MoEForCausalLM
from moe.router import TopKRouter
from tests.train.runner import ROOT, losses, metrics, train
from train import checkpoint
from train.export import export
from train.metrics import expert_load
from train.objective import update_selection_bias


@pytest.mark.parametrize("num_experts", [8, 64])
def test_one_rate_balances_a_skewed_router_for_any_number_of_experts(num_experts):
    g = torch.Generator().manual_seed(0)
    hidden, tokens = 32, 2048
    router = TopKRouter(hidden + 1, num_experts, 2, norm_topk_prob=False)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.2, generator=g)  # logits spread ~1.1 over tokens
        router.weight[:, 0] = 0.0
        router.weight[:2, 0] = 3.0  # a feature every token has: experts 0 and 1 win by ~3 logits
    x = torch.cat([torch.ones(tokens, 1), torch.randn(tokens, hidden, generator=g)], dim=1)
    imbalance = []
    for _ in range(200):
        out = router(x)
        load_E = torch.bincount(out.experts_TK.reshape(-1), minlength=num_experts).float()
        imbalance.append(expert_load(load_E[None])["load_max_over_mean"])
        update_selection_bias([router], [load_E], rate=0.02)
    assert imbalance[0] > 0.6 * num_experts / 2  # most tokens on experts 0 and 1
    assert max(imbalance[-20:]) < 1.5, imbalance[-20:]
    bias = router.selection_bias
    assert bias[:2].max() < bias[2:].min()
    assert abs(bias.mean().item()) < 1e-6  # centred: sign steps would otherwise drift it upwards
    out = router(x)  # the combine weights stay the unbiased probabilities
    torch.testing.assert_close(out.weights_TK, out.probs_TE.gather(-1, out.experts_TK))


# ---- through the trainer --------------------------------------------------------------------------

RATE = 0.1
RUN = [
    "data.seq_len=64",
    "deepspeed.micro_batch_size=4",  # 512 assignments a step: ~37 per expert
    "max_steps=24",
    "optim.lr=1e-4",  # the bias, not the router's own drift, should move the load
    "model.router_aux_loss_coef=0.0",
    f"moe.bias_update_rate={RATE}",
]


def skewed_model(out: Path) -> None:
    """The tiny MoE (2 layers) with every token preferring a few experts, as a Hugging Face directory.

    A direction shared by all embeddings gives every token's router input a common component;
    router rows 0 and 1 are aligned with it (and all rows scaled x5, so that tokens differ by
    ~0.5 logits): most tokens pick experts 0 and 1 (and a few experts the common part favours by
    chance), `load_max_over_mean` ~6 of at most 7. With `moe.bias_update_rate=0` it stays there.
    """
    fields = yaml.safe_load((ROOT / "configs" / "model" / "tiny_moe.yaml").read_text())
    cfg = ModelConfig(**{**fields, "num_hidden_layers": 2})
    model = Qwen2MoEForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(cfg.hidden_size, generator=g)
    shared /= shared.norm()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb += emb.norm(dim=1).mean() * shared
        for m in model.modules():
            if isinstance(m, TopKRouter):
                m.weight.mul_(5.0)
                m.weight[:2] += 0.3 * shared
    save_pretrained(model, out, dtype="float32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    skewed_model(root / "skewed")
    init = f"init_from={root / 'skewed'}"
    straight, paused = root / "straight", root / "paused"
    train(straight, init, *RUN)
    train(paused, init, *RUN, "stop_at_step=12")
    train(paused, init, *RUN)  # checkpoint.resume=auto
    return straight, paused


def biases(run: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.list_complete(run)[-1] / "buffers.safetensors")


@pytest.mark.slow
def test_bias_moves_a_skewed_router_towards_balance(runs):
    straight, _ = runs
    load = [m["moe/load_max_over_mean"] for m in metrics(straight)]
    assert load[0] > 5.0
    assert statistics.mean(load[-5:]) < 0.5 * load[0], load
    for name, bias_E in biases(straight).items():
        assert bias_E[:2].mean() < 0, name  # the favoured experts were pushed down
        assert abs(bias_E.mean().item()) < 1e-6, name


@pytest.mark.slow
def test_resume_restores_the_bias_exactly(runs):
    straight, paused = runs
    a, b = biases(straight), biases(paused)
    assert sorted(a) == ["model.layers.0.mlp.gate.selection_bias", "model.layers.1.mlp.gate.selection_bias"]
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    a_loss, b_loss = losses(straight), losses(paused)
    assert sorted(b_loss) == list(range(1, 25))
    for step, loss in a_loss.items():
        assert b_loss[step] == pytest.approx(loss, rel=1e-6, abs=0), step


@pytest.mark.slow
def test_export_writes_the_bias_for_transformers_to_ignore(runs, tmp_path, capsys):
    straight, _ = runs
    out = tmp_path / "hf"
    export(straight, out, dtype="float32")
    assert "transformers' Qwen2-MoE ignores them" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    written = {}
    for shard in set(index.values()):
        written |= load_file(out / shard)
    for name, bias_E in biases(straight).items():
        key = name.replace("selection_bias", "e_score_correction_bias")
        assert torch.equal(written[key], bias_E), key
