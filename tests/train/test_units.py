"""Pure-Python pieces of the trainer: schedules, aux-loss-free balancing, sequence-scope balance, MFU."""

import math

import pytest
import torch

from moe.config import ModelConfig
from moe.losses import balance_stats, load_balancing_loss
from moe.model import Qwen2MoEForCausalLM
from moe.router import TopKRouter
from train.config import (
    BalanceScope,
    DeepSpeedConfig,
    ParallelConfig,
    ScheduleConfig,
    ScheduleKind,
    TrainConfig,
)
from train.metrics import expert_load, flops_per_token
from train.objective import Objective, update_selection_bias
from train.schedule import STEP_DECAY, lr_lambda


def test_schedules():
    cos = lr_lambda(ScheduleConfig(kind=ScheduleKind.cosine, warmup_steps=4, min_lr_ratio=0.1), 104)
    assert [cos(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert cos(4) == pytest.approx(1.0)
    assert cos(54) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cos(104) == pytest.approx(0.1)
    step = lr_lambda(ScheduleConfig(kind=ScheduleKind.step, warmup_steps=0), 100)
    assert [step(79), step(80), step(89), step(90), step(99)] == [
        1.0,
        STEP_DECAY,
        STEP_DECAY,
        STEP_DECAY**2,
        STEP_DECAY**2,
    ]
    const = lr_lambda(ScheduleConfig(kind=ScheduleKind.constant, warmup_steps=1), 10)
    assert [const(0), const(1), const(9)] == [0.5, 1.0, 1.0]


def test_aux_loss_free_bias_moves_towards_balance():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2, norm_topk_prob=False)
    torch.nn.init.normal_(router.weight, 0, 0.02)
    router.weight.data[0] += 0.1  # expert 0 preferred by every token
    x = torch.randn(512, 16) + 1.0
    imbalance = []
    for _ in range(300):
        out = router(x)
        load = torch.bincount(out.experts_TK.reshape(-1), minlength=8).float()
        imbalance.append(expert_load(load[None])["load_max_over_mean"])
        update_selection_bias([router], [load], rate=0.02)
    assert imbalance[0] > 3.0
    assert max(imbalance[-20:]) < 1.5
    out = router(x)  # combine weights stay the unbiased probabilities
    torch.testing.assert_close(out.weights_TK, out.probs_TE.gather(-1, out.experts_TK))


def test_sequence_scope_is_mean_of_per_sequence_losses():
    cfg = ModelConfig(expert_backend="torch", num_hidden_layers=2)
    model = Qwen2MoEForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 256, (3, 10))
    out = model(ids, targets=ids)
    got = Objective(BalanceScope.sequence, 1.0, 0.0).balance_loss(out)
    want = torch.stack([load_balancing_loss(model(ids[b : b + 1]).balance) for b in range(3)]).mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, out.aux_loss)  # it really is a different scope
    assert balance_stats(out.routers[0]).rows == 30


def test_flops_per_token_dense_formula():
    cfg = ModelConfig(
        num_experts=0,
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    n = cfg.num_params()["activated_non_embedding"] + 100 * 64
    assert flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 64 * 32


def test_train_config_validation():
    with pytest.raises(ValueError, match="parallel.ep_size=4 must divide model.num_experts=6"):
        TrainConfig(model=ModelConfig(num_experts=6), parallel=ParallelConfig(ep_size=4)).validate(
            world_size=4
        )
    with pytest.raises(ValueError, match="deepspeed.zero_stage must be 0, 1 or 2"):
        TrainConfig(deepspeed=DeepSpeedConfig(zero_stage=3)).validate()
    assert math.isfinite(TrainConfig().validate().optim.lr)
    with pytest.raises(ValueError, match="zero_stage=0 with deepspeed.bf16=true is not supported"):
        TrainConfig(deepspeed=DeepSpeedConfig(zero_stage=0, bf16=True)).validate()
    # grouped-GEMM alignment depends on the run's dtype: 20 is fine in fp32, not in bf16
    moe = ModelConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=20)
    TrainConfig(model=moe, deepspeed=DeepSpeedConfig(bf16=False)).validate()
    with pytest.raises(ValueError, match="moe_intermediate_size=20 must be a multiple of 8 for bfloat16"):
        TrainConfig(model=moe, deepspeed=DeepSpeedConfig(bf16=True)).validate()


def test_bf16_null_means_cuda_only():
    cfg = TrainConfig(device="cpu")
    assert cfg.deepspeed.bf16 is None and not cfg.uses_bf16()
    assert TrainConfig(device="cpu", deepspeed=DeepSpeedConfig(bf16=True)).uses_bf16()


def test_free_port_draws_from_the_configured_range(monkeypatch):
    """`FINEMOE_PORTS` bounds the rendezvous port (the suite gives each xdist worker its own slice)."""
    import socket

    from train import engine

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # in use: never handed out (the OS picks it: no one else holds it)
        port = taken.getsockname()[1]
        monkeypatch.setenv(engine.PORTS, f"{port - 2}-{port + 2}")
        assert {engine.free_port() for _ in range(40)} <= {port - 2, port - 1, port + 1}
        monkeypatch.setenv(engine.PORTS, f"{port}-{port + 1}")
        with pytest.raises(RuntimeError, match=f"no free TCP port in {port}-{port + 1}"):
            engine.free_port()
