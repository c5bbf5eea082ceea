"""Worker for the 2-process tests: trains a tiny MoE a few steps through the real DeepSpeed engine.

Run by the deepspeed launcher (or alone); writes per-step losses, gradient norms and (optionally)
the full gradients of every parameter, gathered to global expert ids, to a JSON/pt file.
Usage: python -m tests.train.ep_worker OUT.pt ep_size zero_stage grad_accum micro_batch scope
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from moe.config import ModelConfig
from moe.model import Qwen2MoEForCausalLM
from train import engine as ds
from train.config import BalanceScope
from train.objective import Objective

STEPS = 5
GLOBAL_SEQS = 4
SEQ = 16


def tiny_moe() -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        expert_backend="torch",
    )


def global_batches(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (GLOBAL_SEQS, SEQ + 1), generator=g)


SKEW_STEP = 2
"""At this step expert 3 receives every token of the first half of the global batch and none of the
second half (one rank has tokens for it, the other none), and expert 0 receives no token at all."""


def set_skew(routers, step: int, virtual_rank: int) -> None:
    for r in routers:
        r.use_selection_bias = step == SKEW_STEP
        r.selection_bias.zero_()
        if step == SKEW_STEP:
            r.selection_bias[3] = 10.0 if virtual_rank == 0 else -10.0
            r.selection_bias[0] = -10.0


def main() -> None:
    out_path, ep_size, zero, ga, mb, scope = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
    rank, world = ds.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = Qwen2MoEForCausalLM(tiny_moe())
    model.init_weights(torch.Generator().manual_seed(0))
    group = ds.shard_experts(model, ep_size)
    eng = ds.build_engine(
        model,
        ep_group_name=group,
        ep_size=ep_size,
        num_experts=4,
        lr=1e-2,
        weight_decay=0.1,
        zero_stage=zero,
        micro_batch_size=mb,
        grad_accum=ga,
        grad_clip=0.05,
    )
    objective = Objective(BalanceScope(scope), 0.01, 0.001, ds.dp_group())
    assert mb * ga * world == GLOBAL_SEQS
    routers = [m for m in model.modules() if hasattr(m, "selection_bias")]
    record: dict = {"loss": [], "grad_norm": [], "grads": [], "expert_tokens": []}
    for step in range(STEPS):
        ids = global_batches(step)
        # rank r's micro-batch a holds sequences r*mb*ga + a*mb ... (same global set for every layout)
        mine = ids[rank * mb * ga : (rank + 1) * mb * ga]
        objective.start_step()
        total = 0.0
        for a in range(ga):
            # the skew is per micro-batch: only comparable across layouts whose micro-batches are half-batches
            skew_step = step if scope == "micro_batch" else -1
            set_skew(routers, skew_step, virtual_rank=(rank * mb * ga + a * mb) * 2 // GLOBAL_SEQS)
            chunk = mine[a * mb : (a + 1) * mb]
            out = eng(input_ids=chunk[:, :-1], targets=chunk[:, 1:])
            counts = torch.stack([b.counts_E for b in out.balance])
            dist.all_reduce(counts)
            record["expert_tokens"].append(counts)
            terms = objective(out)
            eng.backward(terms.loss)
            if eng.is_gradient_accumulation_boundary():
                record["grads"].append(_gathered_grads(eng, model, group, ep_size))
            ds.clip_gradients(eng)
            eng.step()
            total += float(terms.loss.detach()) / ga
        t = torch.tensor([total])
        dist.all_reduce(t)
        record["loss"].append(t.item() / world)
        record["grad_norm"].append(ds.grad_norm(eng))
    if rank == 0:
        torch.save(record, out_path)
    dist.barrier()


def _gathered_grads(eng, model, group, ep_size) -> dict[str, torch.Tensor]:
    """Averaged full gradients (before the optimizer step), experts concatenated over EP ranks."""
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, p in model.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            g = p.grad
        g = g.detach().clone() if g is not None else torch.zeros_like(p)
        if ep_size > 1 and name.endswith(("gate_up_proj", "down_proj")) and "experts" in name:
            parts = [torch.empty_like(g) for _ in range(ep_size)]
            dist.all_gather(parts, g, group=ds.groups._get_expert_parallel_group(group))
            g = torch.cat(parts)
        grads[name] = g
    return grads


if __name__ == "__main__":
    main()
