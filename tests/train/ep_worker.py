"""Worker for the multi-process tests: trains a tiny MoE a few steps through the trainer's own
optimizer step (`train.trainer.optimizer_step`) on the real DeepSpeed engine.

Run by the deepspeed launcher (or alone). Every layout sees the same global batch per step: rank r's
micro-batch a holds sequences r*mb*ga + a*mb ... of it. Writes, from rank 0, per-step losses and
gradient norms, every micro-batch's expert counts (summed over ranks), and, unless --no-grads, the
full gradient of every parameter before the update (experts gathered to global ids).

    python -m tests.train.ep_worker OUT.pt NAME="--ep 2 --zero 1 --ga 1 --mb 2 [--bf16 ...]" [NAME=...]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state

from cli import run_without_finalizing
from moe.config import ModelConfig
from moe.model import Qwen2MoEForCausalLM
from train import engine as ds
from train.comm import Comm
from train.config import BalanceScope
from train.objective import Objective
from train.trainer import optimizer_step

SEQ = 16

SKEW_STEP = 2
"""At this step expert 3 receives every token of the first half of the global batch and none of the
second half (one rank has tokens for it, the other none), and expert 0 receives no token at all."""
EMPTY_RANK_STEP = 3
"""At this step every token picks experts 0 and 1: every expert-parallel rank but the first receives no
row at all (its all-to-all input is empty), for any layout."""


def tiny_moe(num_experts: int = 4) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=num_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        expert_backend="torch",
    )


def global_batch(step: int, seqs: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (seqs, SEQ + 1), generator=g)


def set_skew(routers, step: int, half: int) -> None:
    """Selection biases for the skewed steps; `half` is which half of the global batch is running."""
    for r in routers:
        r.selection_bias.zero_()
        r.use_selection_bias = step in (SKEW_STEP, EMPTY_RANK_STEP)
        if step == SKEW_STEP:
            r.selection_bias[3] = 10.0 if half == 0 else -10.0
            r.selection_bias[0] = -10.0
        elif step == EMPTY_RANK_STEP:
            r.selection_bias[:2] = 10.0


def parser() -> argparse.ArgumentParser:
    """One run's options (a launch may run several: see `main`)."""
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--mb", type=int, default=2)
    p.add_argument("--scope", default="micro_batch")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--grad-accum-dtype", default="fp32")
    p.add_argument("--overlap-comm", action="store_true", help="ZeRO-2's overlap_comm")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--no-grads", action="store_true")
    p.add_argument("--no-skew", action="store_true")
    p.add_argument("--no-half-skew", action="store_true", help="skip SKEW_STEP (keep EMPTY_RANK_STEP)")
    p.add_argument("--global-seqs", type=int, default=4)
    p.add_argument(
        "--save",
        metavar="DIR",
        help="after training, save a checkpoint into DIR through train.checkpoint.save and record, per "
        "rank, the bytes it copied to host memory and the bytes it wrote",
    )
    p.add_argument(
        "--check-accum",
        action="store_true",
        help="record, per parameter, how far the accumulated and reduced gradient is from the exact sum "
        "of every micro-batch's own (bf16) gradient",
    )
    return p


def main() -> None:
    """`OUT.pt NAME=ARGS [NAME=ARGS ...]`: each run in turn, in this one launch (new model and engine
    each, the process group shared), saving {name: record}. One launch per layout saves the
    interpreter and DeepSpeed start-up of every further run."""
    out, *specs = sys.argv[1:]
    comm = Comm.init("cpu")
    records = {}
    for spec in specs:
        name, _, args = spec.partition("=")
        records[name] = train(parser().parse_args(args.split()), comm)
    if comm.rank == 0:
        torch.save(records, out)
    comm.barrier()


def train(args: argparse.Namespace, comm: Comm) -> dict:
    rank, world = comm.rank, comm.world
    torch.manual_seed(0)
    model = Qwen2MoEForCausalLM(tiny_moe(args.experts))
    model.init_weights(torch.Generator().manual_seed(0))
    group = ds.shard_experts(model, args.ep)
    eng = ds.build_engine(
        model,
        ep_group_name=group,
        ep_size=args.ep,
        num_experts=args.experts,
        lr=args.lr,
        weight_decay=0.1,
        zero_stage=args.zero,
        micro_batch_size=args.mb,
        grad_accum=args.ga,
        grad_clip=0.05,
        bf16=args.bf16,
        grad_accum_dtype=args.grad_accum_dtype,
        overlap_comm=args.overlap_comm,
    )
    objective = Objective(BalanceScope(args.scope), 0.01, 0.001, comm, ds.dp_group())
    mb, ga, seqs = args.mb, args.ga, args.global_seqs
    assert mb * ga * world == seqs
    routers = [m for m in model.modules() if hasattr(m, "selection_bias")]
    record: dict = {"loss": [], "grad_norm": [], "grads": [], "expert_tokens": [], "skipped": []}
    exact = _exact_gradient_sums(model) if args.check_accum else None

    def batches(step: int):
        mine = global_batch(step, seqs)[rank * mb * ga : (rank + 1) * mb * ga]
        for a in range(ga):
            # SKEW_STEP biases each half of the global batch differently: only layouts whose micro-batches
            # all lie within one half can reproduce it (compared runs must agree on --no-half-skew)
            first = rank * mb * ga + a * mb
            assert args.no_half_skew or (first + mb - 1) * 2 // seqs == first * 2 // seqs
            skip = args.no_skew or (step == SKEW_STEP and args.no_half_skew)
            set_skew(routers, -1 if skip else step, half=first * 2 // seqs)
            chunk = mine[a * mb : (a + 1) * mb]
            yield {"input_ids": chunk[:, :-1], "targets": chunk[:, 1:]}

    def on_forward(out) -> None:
        record["expert_tokens"].append(comm.sum(torch.stack([b.counts_E for b in out.balance])))
        record.setdefault("dtypes", _dtypes(model, eng, out))

    def before_update(engine) -> None:
        if exact is not None:
            record.setdefault("accum_error", []).append(_accumulation_error(model, exact, comm, group))
            for v in exact.values():
                v.zero_()
        if not args.no_grads:
            record["grads"].append(_gathered_grads(model, group, args.ep))

    for step in range(args.steps):
        result = optimizer_step(
            eng, objective, comm, batches(step), ga, before_update=before_update, on_forward=on_forward
        )
        record["loss"].append(comm.sum(result.sums[0]).item() / world)
        record["grad_norm"].append(ds.grad_norm(eng))
        record["skipped"].append(result.nonfinite)
    ds.link_optimizer_state(eng)
    moment = safe_get_full_optimizer_state(model.model.layers[0].mlp.experts.gate_up_proj, "exp_avg")
    record["dtypes"]["adam_moment"] = str(moment.dtype) if moment is not None else "none"
    if args.save:
        record["save_io"] = _save_io(eng, model, comm, args.save, args.steps, group)
    return record


def _save_io(eng, model, comm: Comm, run_dir: str, step: int, group) -> dict[str, list[int]]:
    """Per rank: bytes handed to the host (`.cpu()`, `.to(cpu)`) during one `checkpoint.save`, bytes of
    checkpoint tensors that rank wrote, and bytes of its shard files."""
    from train import checkpoint
    from train.checkpoint_store import SegmentWriter

    copied = [0]
    tensors = [0]
    originals = {"cpu": torch.Tensor.cpu, "to": torch.Tensor.to, "add": SegmentWriter.add}

    def cpu(self, *args, **kwargs):
        copied[0] += self.numel() * self.element_size()
        return originals["cpu"](self, *args, **kwargs)

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        target = target.device if isinstance(target, torch.Tensor) else target
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
            copied[0] += self.numel() * self.element_size()
        return originals["to"](self, *args, **kwargs)

    def add(self, logical, shape, start, segment):
        tensors[0] += segment.numel() * segment.element_size()
        return originals["add"](self, logical, shape, start, segment)

    torch.Tensor.cpu, torch.Tensor.to, SegmentWriter.add = cpu, to, add  # type: ignore[method-assign]
    try:
        saved = checkpoint.save(eng, model, comm, run_dir, step, {}, group, keep_last=1)
    finally:
        torch.Tensor.cpu, torch.Tensor.to, SegmentWriter.add = originals.values()  # type: ignore[method-assign]

    def per_rank(value: int) -> list[int]:
        mine = torch.zeros(comm.world, dtype=torch.int64)
        mine[comm.rank] = value
        return comm.sum(mine).tolist()

    return {
        "host_copied": per_rank(copied[0]),
        "tensor_bytes": per_rank(tensors[0]),
        "file_bytes": per_rank(saved.bytes_written),
    }


def _dtypes(model, eng, out) -> dict[str, str]:
    """The dtype of every kind of tensor of the run, as the first forward sees them."""
    from deepspeed.utils import safe_get_full_fp32_param

    experts = model.model.layers[0].mlp.experts
    router = model.model.layers[0].mlp.gate
    kinds = {
        "expert_weight": experts.gate_up_proj,
        "attention_weight": model.model.layers[0].self_attn.q_proj.weight,
        "logits": out.logits,
        "router_logits": out.routers[0].logits_TE,
        "router_weights": out.routers[0].weights_TK,
        "selection_bias": router.selection_bias,
        "ce_loss": out.ce_loss,
        "z_loss": out.z_loss,
        "master_weight": safe_get_full_fp32_param(experts.gate_up_proj),
    }
    return {k: str(v.dtype) if v is not None else "none" for k, v in kinds.items()}


def _exact_gradient_sums(model) -> dict[str, torch.Tensor]:
    """fp64 running sums of each micro-batch's own gradient, as autograd hands it to the parameter
    (before DeepSpeed accumulates it in its own buffer and dtype)."""
    sums = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in model.named_parameters()}

    def add_to(total: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            total.add_(grad.double())

        return hook

    for name, p in model.named_parameters():
        p.register_hook(add_to(sums[name]))
    return sums


def _accumulation_error(model, exact: dict[str, torch.Tensor], comm: Comm, group) -> dict[str, float]:
    """Per parameter: max |accumulated and reduced gradient - exact expectation| / max |expectation|.

    DeepSpeed averages dense gradients over all ranks, and expert gradients (each rank's experts already
    hold every rank's tokens) over the expert-data-parallel group, dividing by the world size.
    """
    from deepspeed.utils import safe_get_full_grad

    errors = {}
    for name, p in model.named_parameters():
        got = safe_get_full_grad(p)
        if got is None:
            raise RuntimeError(f"no gradient for {name}")
        reduce_group = ds.edp_group(group) if not getattr(p, "allreduce", True) else None
        want = comm.sum(exact[name], group=reduce_group) / comm.world
        errors[name] = float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))
    return errors


def _gathered_grads(model, group, ep_size) -> dict[str, torch.Tensor]:
    """Averaged full fp32 gradients (before the update), experts concatenated over EP ranks.

    A parameter without a gradient fails the run: a gradient that was never computed must not pass as
    zeros.
    """
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, p in model.named_parameters():
        g = safe_get_full_grad(p)
        if g is None:
            g = p.grad
        if g is None:
            raise RuntimeError(f"no gradient for {name}")
        g = g.detach().float().clone()
        if ep_size > 1 and name.endswith(("gate_up_proj", "down_proj")) and "experts" in name:
            parts = [torch.empty_like(g) for _ in range(ep_size)]
            dist.all_gather(parts, g, group=ds.groups._get_expert_parallel_group(group))
            g = torch.cat(parts)
        grads[name] = g
    return grads


if __name__ == "__main__":
    run_without_finalizing(main)  # the process groups must not meet interpreter finalization
