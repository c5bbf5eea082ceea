"""Worker for the memory-planner test: what the real DeepSpeed engine holds, per rank and per category.

For each configuration (ZeRO stage, bf16, gradient-accumulation dtype) it builds the engine with
`train.engine.shard_experts` + `build_engine`, runs one full step (so Adam's moments and every lazy
buffer exist), then a second step during which it takes snapshots: at the start of every gradient
reduction (DeepSpeed's IPG bucket flush, the engine's flattened all-reduce buckets), when
BF16_Optimizer's hook moves a gradient to fp32, after the backward pass, and when the torch optimizer
steps. A snapshot sums the storage bytes of the tensors
DeepSpeed and the model hold, per category, counting each storage once (parameters and gradients are
views into flat buffers). The peak of each category over the snapshots is what `train.memory` plans.

Usage (through the deepspeed launcher): python -m tests.train.memory_worker OUT.json CONFIG... [--verbose]
with CONFIG = zero_stage:bf16(0|1):grad_accum_dtype:ep_size, e.g. 0:0:fp32:2 1:1:fp32:2 2:1:bf16:1.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from cli import run_without_finalizing
from moe.config import ExpertBackend, ModelConfig
from moe.model import Qwen2MoEForCausalLM
from train import engine as ds

CATEGORIES = ("weights", "gradients", "master", "optimizer", "reduce_buffers")
MICRO_BATCH = 2
SEQ = 16


def model_config() -> ModelConfig:
    """A small MoE with a dense-MLP layer; widths are multiples of 8 (bf16 grouped_mm on CPU)."""
    return ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[1],
        expert_backend=ExpertBackend.torch,
    )


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class Meter:
    """Snapshots of the engine's tensors, by category; keeps the peak of each."""

    def __init__(self, eng: Any, model: torch.nn.Module):
        self.eng, self.model = eng, model
        self.opt = eng.optimizer  # DeepSpeed's wrapper (ZeRO / BF16_Optimizer) or the torch optimizer
        self.torch_opt = getattr(self.opt, "optimizer", self.opt)
        self.bucket_ptrs: set[int] = set()
        self.peak = dict.fromkeys(CATEGORIES, 0)
        self.active = False

    # ---- what each category holds ----------------------------------------------------------------
    def _weights(self) -> Iterable[torch.Tensor]:
        return (p.data for p in self.model.parameters())

    def _master(self) -> Iterable[torch.Tensor]:
        for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            yield from getattr(self.opt, name, [])

    def _optimizer(self) -> Iterable[torch.Tensor]:
        for st in self.torch_opt.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    yield st[k]

    def _buckets(self) -> Iterable[torch.Tensor]:
        for bucket in getattr(self.opt, "ipg_buckets", {}).values():
            yield from bucket.buffer

    def _gradients(self) -> Iterable[torch.Tensor]:
        for p in self.model.parameters():
            for g in (p.grad, getattr(p, "grad_accum", None)):
                if g is not None:
                    yield g
        opt = self.opt
        if getattr(opt, "grads_in_partition", None) is not None:
            yield opt.grads_in_partition
        for store in ("averaged_gradients", "all_grad_tensors"):
            for v in getattr(opt, store, {}).values():
                if v is None:
                    continue
                flat = getattr(v, "flat_partition", None)
                if flat is not None:
                    yield flat
                else:
                    yield from (t for t in v if isinstance(t, torch.Tensor))
        yield from getattr(opt, "fp32_groups_gradients_flat", [])
        for master in self._master():
            if master.grad is not None:
                yield master.grad

    # ---- snapshots -----------------------------------------------------------------------------
    def snap(self, where: str, extra: torch.Tensor | None = None) -> None:
        if not self.active:
            return
        for b in self._buckets():
            self.bucket_ptrs.add(_storage(b)[0])
        seen: set[int] = set()
        sizes = dict.fromkeys(CATEGORIES, 0)

        def add(cat: str, tensors: Iterable[torch.Tensor]) -> None:
            for t in tensors:
                ptr, nbytes = _storage(t)
                if ptr in seen or nbytes == 0:
                    continue
                seen.add(ptr)
                sizes["reduce_buffers" if ptr in self.bucket_ptrs else cat] += nbytes

        add("weights", self._weights())
        add("master", self._master())
        add("optimizer", self._optimizer())
        add("reduce_buffers", self._buckets())
        add("gradients", self._gradients())
        if extra is not None:
            add("reduce_buffers", [extra])
        for k, v in sizes.items():
            self.peak[k] = max(self.peak[k], v)
        if "--verbose" in sys.argv and dist.get_rank() == 0:
            print(where, sizes, flush=True)

    def install(self) -> None:
        self.torch_opt.register_step_pre_hook(lambda *_: self.snap("optimizer step"))
        for owner in (self.opt, self.eng):  # ZeRO's own and the engine's flattened all-reduce buckets
            orig = getattr(owner, "allreduce_bucket", None)
            if orig is not None:

                def wrapped(*a, _orig=orig, **k):
                    out = _orig(*a, **k)
                    self.snap("all-reduce bucket", extra=out)
                    return out

                owner.allreduce_bucket = wrapped
        orig_allreduce = self.eng.allreduce_gradients  # the boundary reduction, after autograd's backward

        def allreduce_gradients(*a, **k):
            self.snap("before the reduction")
            return orig_allreduce(*a, **k)

        self.eng.allreduce_gradients = allreduce_gradients
        orig_move = getattr(self.opt, "accumulate_hp_grads_and_remove_lp", None)
        if orig_move is not None:  # BF16_Optimizer with immediate_grad_update: per-parameter hook

            def accumulate_hp_grads_and_remove_lp(*a, **k):
                self.snap("before a gradient moves to fp32")
                return orig_move(*a, **k)

            self.opt.accumulate_hp_grads_and_remove_lp = accumulate_hp_grads_and_remove_lp
        orig_reduce = getattr(self.opt, "reduce_ipg_grads", None)
        if orig_reduce is not None:

            def reduce_ipg_grads(*a, **k):
                self.snap("before IPG reduce")
                out = orig_reduce(*a, **k)
                self.snap("after IPG reduce")
                return out

            self.opt.reduce_ipg_grads = reduce_ipg_grads


def measure(
    zero: int, bf16: bool, accum: str, ep_size: int, bucket: int | None, overlap: bool = False
) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = model_config()
    model = Qwen2MoEForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    group = ds.shard_experts(model, ep_size)
    kwargs: dict[str, Any] = {}
    if "grad_accum_dtype" in inspect.signature(ds.build_engine).parameters:
        kwargs["grad_accum_dtype"] = accum
    elif bf16 and accum != "bf16":
        raise SystemExit("train.engine.build_engine has no grad_accum_dtype (DeepSpeed's default is bf16)")
    if bucket is not None:
        kwargs["reduce_bucket_size"] = bucket
    if overlap:
        kwargs["overlap_comm"] = True
    eng = ds.build_engine(
        model,
        ep_group_name=group,
        ep_size=ep_size,
        num_experts=cfg.num_experts,
        lr=1e-3,
        zero_stage=zero,
        micro_batch_size=MICRO_BATCH,
        bf16=bf16,
        **kwargs,
    )
    meter = Meter(eng, model)
    meter.install()
    g = torch.Generator().manual_seed(dist.get_rank())
    for step in range(2):
        meter.active = step == 1
        ids = torch.randint(0, cfg.vocab_size, (MICRO_BATCH, SEQ + 1), generator=g)
        out = eng(input_ids=ids[:, :-1], targets=ids[:, 1:])
        eng.backward(out.loss)
        meter.snap("after backward")
        eng.step()
        meter.snap("after step")
    result = {"peak": meter.peak, "optimizer": type(eng.optimizer).__name__}
    eng.destroy()
    return result


def main() -> None:
    out_path = sys.argv[1]
    specs = [a for a in sys.argv[2:] if not a.startswith("--")]
    rank, world = ds.init_distributed(torch.device("cpu"))
    results = []
    for spec in specs:
        zero, bf16, accum, ep_size, *rest = spec.split(":")  # [:bucket (0: default)[:overlap_comm]]
        size = (int(rest[0]) or None) if rest else None
        overlap = len(rest) > 1 and rest[1] == "1"
        measured = measure(int(zero), bool(int(bf16)), accum, int(ep_size), size, overlap)
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, measured)
        config = {"zero_stage": int(zero), "bf16": bool(int(bf16)), "grad_accum_dtype": accum}
        results.append(
            {
                **config,
                "ep_size": int(ep_size),
                "world_size": world,
                "bucket": size,
                "overlap_comm": overlap,
                "ranks": per_rank,
            }
        )
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    run_without_finalizing(main)  # the process groups must not meet interpreter finalization
