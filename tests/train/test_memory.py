"""train.memory: hand-computed layouts, the parameter inventory against the built model, the CLI, bad
inputs, and (2 processes, real deepspeed launcher) the plan against what the DeepSpeed engine holds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe.config import ModelConfig
from moe.params import load_preset
from train.memory import MemoryConfig, activations, format_plan, optimizer_groups, parameters, plan

ROOT = Path(__file__).resolve().parents[2]


def small() -> ModelConfig:
    """Shapes small enough to lay out by hand (see `test_hand_computed_layout`)."""
    return ModelConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=1,
        moe_intermediate_size=4,
        shared_expert_intermediate_size=0,
        tie_word_embeddings=True,
    ).validate()


# small(), per rank. Dense matrices: embed 16*8 + q 8*8 + k 4*8 + v 4*8 + o 8*8 + router 4*8 = 352.
# Dense vectors: 2 layer norms 8 + q/k/v biases 8+4+4 + final norm 8 = 40. Experts: 4 x (8*8 + 8*4) = 384.
DENSE_DECAY, DENSE_NO_DECAY, EXPERTS = 352, 40, 384


def test_hand_computed_layout():
    cfg = small()
    # 4 ranks, ep 2: 2 experts (192) per rank, their state sharded over the EDP group of 2 ranks;
    # the dense groups over all 4. Flat buffers are padded to a multiple of 2 x group size (8 and 4).
    groups = optimizer_groups(parameters(cfg, 2), world_size=4, ep_size=2)
    assert [(g.numel, g.dp_size, g.expert) for g in groups] == [
        (DENSE_DECAY, 4, False),
        (DENSE_NO_DECAY, 4, False),
        (EXPERTS // 2, 2, True),
    ]
    assert [g.partition for g in groups] == [88, 10, 96]
    local = DENSE_DECAY + DENSE_NO_DECAY + EXPERTS // 2  # 584, no padding needed
    part = 88 + 10 + 96

    z2 = plan(cfg, MemoryConfig(world_size=4, ep_size=2, zero_stage=2, micro_batch_size=1, seq_len=1))
    assert (z2.weights, z2.gradients, z2.master, z2.optimizer) == (2 * local, 4 * part, 4 * part, 8 * part)
    # ZeRO-1 with fp32 accumulation: BF16_Optimizer's fp32 accumulators for all of it, plus the bf16
    # .grad of the largest tensor (the embedding, 128) while its hook moves it
    z1 = plan(cfg, MemoryConfig(world_size=4, ep_size=2, zero_stage=1, micro_batch_size=1, seq_len=1))
    assert (z1.weights, z1.gradients) == (2 * local, 4 * local + 2 * 128)
    assert (z1.master, z1.optimizer) == (4 * part, 8 * part)
    # ZeRO-0 (fp32 only): nothing sharded, the optimizer updates the fp32 weights themselves
    z0 = plan(cfg, MemoryConfig(world_size=4, ep_size=2, zero_stage=0, bf16=False))
    assert (z0.weights, z0.gradients, z0.master, z0.optimizer) == (4 * local, 4 * local, 0, 8 * local)


def test_experts_sharded_over_edp_dense_over_dp():
    cfg = small()
    for world, ep in [(4, 1), (4, 2), (4, 4), (8, 2)]:
        groups = optimizer_groups(parameters(cfg, ep), world_size=world, ep_size=ep)
        for g in groups:
            assert g.dp_size == (world // ep if g.expert else world)
        (experts,) = [g for g in groups if g.expert]
        assert experts.numel == EXPERTS // ep  # num_experts / ep experts on every rank
        assert experts.partition == EXPERTS // ep // (world // ep)  # = EXPERTS / world for any ep
    # so expert parallelism shrinks the weights, not the sharded fp32 state
    mems = [MemoryConfig(world_size=4, ep_size=ep, zero_stage=2) for ep in (1, 2, 4)]
    plans = [plan(cfg, m) for m in mems]
    assert [p.weights for p in plans] == [2 * (392 + EXPERTS // ep) for ep in (1, 2, 4)]
    assert len({(p.master, p.optimizer, p.gradients) for p in plans}) == 1


def test_alignment_padding():
    cfg = small()  # 3 ranks: the dense flat buffers are padded to multiples of 6
    groups = optimizer_groups(parameters(cfg), world_size=3, ep_size=1)
    assert [g.flat for g in groups] == [354, 42, 384]
    assert [g.partition for g in groups] == [118, 14, 128]


def test_contiguous_partition_counts_straddling_parameters_whole():
    cfg = small()
    (decay, *_) = optimizer_groups(parameters(cfg), world_size=4, ep_size=1)
    # decay: embed 128 | q 64 | k 32 | v 32 | o 64 | router 32; partitions of 88
    assert decay.numels == (128, 64, 32, 32, 64, 32)
    assert [decay.in_partition(i) for i in range(4)] == [128, 128 + 64, 64 + 32 + 32 + 64, 64 + 32]


def test_moe_groups_split_like_deepspeed():
    """Experts are chunked into groups of at most 178,956,971 elements, one tensor never split."""
    cfg = load_preset("qwen1_5_moe_a2_7b")
    groups = optimizer_groups(parameters(cfg, 4), world_size=8, ep_size=4)
    experts = [g for g in groups if g.expert]
    per_layer = 15 * 3 * 2048 * 1408  # gate_up + down of 15 local experts: 129.8M, one layer per group
    assert [g.numel for g in experts] == [per_layer] * 24
    assert all(g.numel <= 178_956_971 for g in experts)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("ep", [1, 2])
def test_parameters_match_built_model(tie, ep):
    from moe.model import Qwen2MoEForCausalLM

    cfg = ModelConfig(num_hidden_layers=3, mlp_only_layers=[1], tie_word_embeddings=tie).validate()
    built = [(n, p.numel(), p.ndim) for n, p in Qwen2MoEForCausalLM(cfg).named_parameters()]
    ours = parameters(cfg, ep)
    expected = [(n, k // ep if ".experts." in n else k, d) for n, k, d in built]
    assert [(p.name, p.numel, p.ndim) for p in ours] == expected
    assert [p.name for p in ours if p.expert] == [n for n, _, _ in built if ".experts." in n]
    assert sum(p.numel for p in parameters(cfg)) == cfg.num_params()["total"]


def test_activation_formula_by_hand():
    cfg = small()  # bf16: a=2, h=8, g*d=4, n=2, E=4, k=1, I=4, V=16, no shared expert
    norm = 4 * 8 + 2 * 2 * 8 + 4
    attention = 2 * 2 * 8 + 2 * 2 * 4 + 4 * 2
    router = 4 * 8 + 8 * 4 + 12 * 1
    experts = 2 * 1 * (3 * 8 + 4 * 4 + 1) + 16 * 1
    layer = 2 * norm + attention + router + experts - 2 * 8  # nothing saves the bf16 normed input
    fixed = 8 + 2 * 2 * 4 + norm + 2 * 16 + 4 * 16
    act = activations(cfg, bf16=True)
    assert (act.layers, act.kept, act.fixed, act.loss_transient) == (
        (layer,),
        (2 * 8 + 8 * 4 + 12,),
        fixed,
        8 * 16,
    )
    p = plan(cfg, MemoryConfig(world_size=1, micro_batch_size=3, seq_len=5, zero_stage=2))
    assert p.activations == 15 * (layer + fixed + 128)
    assert p.activations_checkpointed == 15 * (2 * 8 + 8 * 4 + 12 + layer + fixed + 128)
    assert p.total == p.states + p.activations
    mem = MemoryConfig(world_size=1, micro_batch_size=3, seq_len=5, activation_checkpointing=True)
    assert plan(cfg, mem).total == p.states + p.activations_checkpointed
    # the loss 4 tokens at a time: bf16 logits and one fp32 copy of 4 tokens, not the logits, fp32
    # log-softmax and backward gradients of 15; plus the fp32 sum of the head's weight gradient (V x h)
    vocab = 2 * 16 + 4 * 16 + 128
    chunk = 4 * (2 * 16 + 4 * 16) + 4 * 16 * 8
    chunked = plan(cfg, MemoryConfig(world_size=1, micro_batch_size=3, seq_len=5, loss_chunk_tokens=4))
    assert chunked.activations == 15 * (layer + fixed + 128 - vocab) + chunk
    # one token per chunk: the chunk's weight-gradient product (V x h bf16 + its row) is the larger term
    single = plan(cfg, MemoryConfig(world_size=1, micro_batch_size=3, seq_len=5, loss_chunk_tokens=1))
    assert single.activations == 15 * (layer + fixed + 128 - vocab) + (2 * 16 * 8 + 2 * 16) + 4 * 16 * 8


def _saved_bytes_per_token(
    cfg: ModelConfig, dtype, checkpointing: bool, b: int = 2, s: int = 64, loss_chunk_tokens: int = 0
) -> float:
    """Bytes of the tensors autograd saves in one forward of the real model, and of the logits and
    router decisions it returns."""
    import torch

    from moe.model import Qwen2MoEForCausalLM

    model = Qwen2MoEForCausalLM(cfg).to(dtype)
    model.init_weights(torch.Generator().manual_seed(0))
    model.gradient_checkpointing = checkpointing
    model.loss_chunk_tokens = loss_chunk_tokens
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            saved[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids[:, :-1], targets=ids[:, 1:])
    held = [t for r in out.routers for t in vars(r).values()]  # kept until the loss
    held += [out.logits] if out.logits is not None else []
    for t in held:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(saved.values()) / (b * s)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(
    "changes",
    [{}, {"num_key_value_heads": 4}, {"mlp_only_layers": [1]}, {"shared_expert_intermediate_size": 0}],
)
def test_activation_formula_against_saved_tensors(bf16, changes):
    """What the planner counts as saved (all but the loss transient and the recomputed layer) is what
    autograd really keeps, on CPU's fused SDPA kernel, within 2%."""
    import torch

    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        expert_backend="torch",
    ).replace(**changes)
    act = activations(cfg, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    full = _saved_bytes_per_token(cfg, dtype, checkpointing=False)
    assert sum(act.layers) + act.fixed == pytest.approx(full, rel=0.02)
    kept = _saved_bytes_per_token(cfg, dtype, checkpointing=True)
    assert sum(act.kept) + act.fixed == pytest.approx(kept, rel=0.02)
    # loss in chunks: nothing vocabulary-wide is saved (each chunk is recomputed in backward)
    chunked = _saved_bytes_per_token(cfg, dtype, checkpointing=True, loss_chunk_tokens=16)
    assert sum(act.kept) + act.fixed - act.head == pytest.approx(chunked, rel=0.02)


def test_a2_7b_master_and_adam_are_12_bytes_per_parameter_over_all_ranks():
    cfg = load_preset("qwen1_5_moe_a2_7b")
    total = cfg.num_params()["total"]
    for zero, ep in [(1, 1), (2, 2), (2, 4)]:
        p = plan(cfg, MemoryConfig(world_size=8, ep_size=ep, zero_stage=zero))
        padding = 8 * (p.master + p.optimizer) - 12 * total  # < 2 x 8 elements per group and rank
        assert 0 <= padding < 12 * 16 * 26 * 8


def test_cli_last_line(tmp_path):
    args = ["model=tiny_moe", "memory.world_size=2", "memory.ep_size=2", "memory.zero_stage=1"]
    res = subprocess.run(
        [sys.executable, "-m", "train.memory", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert re.fullmatch(r"per_rank_GB \d+\.\d\d", lines[-1])
    want = plan(load_preset("tiny_moe"), MemoryConfig(world_size=2, ep_size=2, zero_stage=1))
    assert float(lines[-1].split()[1]) == pytest.approx(want.total / 1e9, abs=0.005)
    assert "fits in 80 GB" in res.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "train.memory", "memory.ep_size=8"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "memory.ep_size=8 must divide model.num_experts=60" in bad.stdout + bad.stderr


def test_format_plan_verdict_and_last_line():
    cfg = load_preset("qwen1_5_moe_a2_7b")
    out = format_plan(cfg, MemoryConfig(world_size=8, ep_size=4, zero_stage=2, gpu_memory_gb=1))
    assert "does NOT fit in 1 GB" in out
    p = plan(cfg, MemoryConfig(world_size=8, ep_size=4, zero_stage=2))
    assert out.splitlines()[-1] == f"per_rank_GB {p.total / 1e9:.2f}"
    # what does not fit names the activation options that would shrink it, with their plans
    ckpt = plan(cfg, MemoryConfig(world_size=8, ep_size=4, zero_stage=2, activation_checkpointing=True))
    both = plan(
        cfg,
        MemoryConfig(
            world_size=8, ep_size=4, zero_stage=2, activation_checkpointing=True, loss_chunk_tokens=1024
        ),
    )
    assert f"  with memory.activation_checkpointing=true: {ckpt.total / 1e9:.2f} GB" in out
    assert (
        f"  with memory.activation_checkpointing=true memory.loss_chunk_tokens=1024: {both.total / 1e9:.2f} GB"
        in out
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ep_size": 3}, "memory.ep_size=3 must divide memory.world_size=8"),
        ({"ep_size": 8}, "memory.ep_size=8 must divide model.num_experts=60"),
        ({"world_size": 0}, "memory.world_size must be >= 1"),
        ({"zero_stage": 3}, "memory.zero_stage must be 0, 1 or 2"),
        ({"zero_stage": 0}, "memory.zero_stage=0 with memory.bf16=true"),
        ({"grad_accum_dtype": "fp16"}, "memory.grad_accum_dtype must be fp32 or bf16"),
        ({"micro_batch_size": 0}, "memory.micro_batch_size must be >= 1"),
        ({"seq_len": -1}, "memory.seq_len must be >= 1"),
        ({"gpu_memory_gb": 0}, "memory.gpu_memory_gb must be positive"),
    ],
)
def test_bad_inputs(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(load_preset("qwen1_5_moe_a2_7b"), MemoryConfig(**changes))


def test_bad_inputs_dense_model_and_rank():
    with pytest.raises(ValueError, match=re.escape("memory.ep_size=2 needs a MoE model")):
        plan(load_preset("qwen1_5_1_8b"), MemoryConfig(ep_size=2))
    with pytest.raises(ValueError, match="rank=8 outside"):
        plan(load_preset("qwen1_5_moe_a2_7b"), MemoryConfig(), rank=8)


# ---- against the real engine ----------------------------------------------------------------------

# zero_stage:bf16:grad_accum_dtype:ep_size[:reduce_bucket_size (0: default)[:overlap_comm]]. ZeRO-0 is
# fp32 only (train.engine refuses bf16 there); "2:1:fp32:1" shards the experts' state over an EDP group
# of 2 instead of 1; a 100000 bucket is below the model's gradients (DeepSpeed's 5e8 default holds them
# all); the last double-buffers the bucket (ZeRO-2 overlap_comm).
ENGINE_CONFIGS = [
    "0:0:fp32:2",
    "1:1:fp32:2",
    "1:1:bf16:2",
    "2:1:fp32:2",
    "2:1:bf16:2",
    "2:1:fp32:1",
    "2:1:fp32:2:100000",
    "2:1:fp32:2:0:1",
]
COMPARED = ("weights", "gradients", "master", "optimizer", "reduce_buffers")


@pytest.mark.slow
def test_plan_matches_engine_two_processes(tmp_path):
    from tests.train.memory_worker import MICRO_BATCH, SEQ, model_config
    from tests.train.runner import CPU_ENV, module_cmd, run_tree

    out = tmp_path / "memory.json"
    cmd = module_cmd("tests.train.memory_worker", str(out), *ENGINE_CONFIGS, procs=2, local_rank_arg=False)
    env = dict(os.environ, **CPU_ENV)
    res = run_tree(cmd, env, timeout=300)
    assert res.returncode == 0 and out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    cfg = model_config()
    rows = []
    for run in json.loads(out.read_text()):
        mem = MemoryConfig(
            world_size=run["world_size"],
            ep_size=run["ep_size"],
            zero_stage=run["zero_stage"],
            bf16=run["bf16"],
            grad_accum_dtype=run["grad_accum_dtype"],
            micro_batch_size=MICRO_BATCH,
            seq_len=SEQ,
            **({"reduce_bucket_size": run["bucket"]} if run["bucket"] else {}),
            overlap_comm=run["overlap_comm"],
        )
        for rank, got in enumerate(run["ranks"]):
            assert got["optimizer"] == (mem.optimizer if mem.optimizer != "none" else "AdamW")
            want = plan(cfg, mem, rank=rank)
            for cat in COMPARED:
                measured, planned = got["peak"][cat], getattr(want, cat)
                rows.append(
                    f"{run['zero_stage']}:{run['bf16']:d}:{run['grad_accum_dtype']}:ep{mem.ep_size}"
                    f":{mem.reduce_bucket_size}{':overlap' if mem.overlap_comm else ''} "
                    f"rank {rank} {cat:<15} measured {measured:>13,} planned {planned:>13,}"
                )
                if cat == "reduce_buffers" and run["bucket"]:
                    # the bucket itself is exact; its reduction copy holds one bucket's fill, which depends
                    # on the order autograd hands over the gradients: planned as a whole bucket (a bound)
                    lp = 2 if mem.bf16 else 4
                    assert lp * run["bucket"] <= measured <= planned, rows[-1]
                else:
                    assert planned == pytest.approx(measured, rel=0.05, abs=0), rows[-1]
    print("\n".join(rows))
