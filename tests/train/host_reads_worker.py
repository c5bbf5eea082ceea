"""Counts the host reads (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, ...) of one optimizer step through
`train.trainer.optimizer_step`, with 1 and with 4 micro-batches of the same tokens, for ZeRO 0, 1, 2.

Usage: python -m tests.train.host_reads_worker OUT.json
"""

from __future__ import annotations

import collections
import json
import sys

import torch

from cli import run_without_finalizing
from moe.model import Qwen2MoEForCausalLM
from tests.train.ep_worker import global_batch, tiny_moe
from train import engine as ds
from train.comm import Comm
from train.config import BalanceScope
from train.objective import Objective
from train.trainer import optimizer_step

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def count_reads(step) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        step()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return dict(counts)


def main() -> None:
    comm = Comm.init("cpu")
    ids = global_batch(0, 4)
    result = {}
    for zero in (0, 1, 2):
        for ga, mb in ((1, 4), (4, 1)):
            torch.manual_seed(0)
            model = Qwen2MoEForCausalLM(tiny_moe())
            model.init_weights(torch.Generator().manual_seed(0))
            group = ds.shard_experts(model, 1)
            eng = ds.build_engine(
                model,
                ep_group_name=group,
                ep_size=1,
                num_experts=4,
                lr=1e-3,
                zero_stage=zero,
                micro_batch_size=mb,
                grad_accum=ga,
            )
            objective = Objective(BalanceScope.micro_batch, 0.01, 0.001, comm, ds.dp_group())

            def step(eng=eng, objective=objective, ga=ga, mb=mb):
                batches = (
                    {"input_ids": ids[a * mb : (a + 1) * mb, :-1], "targets": ids[a * mb : (a + 1) * mb, 1:]}
                    for a in range(ga)
                )
                optimizer_step(eng, objective, comm, batches, ga)

            step()  # the first step creates lazy state (Adam moments, buffers)
            result[f"zero{zero}_ga{ga}"] = count_reads(step)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    run_without_finalizing(main)  # the process groups must not meet interpreter finalization
