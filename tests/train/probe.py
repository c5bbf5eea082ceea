"""Logits of a checkpoint as the trainer restores it (engine + `checkpoint.load`), for export tests.

Usage: python -m tests.train.probe CHECKPOINT_DIR OUT.pt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from moe.config import ModelConfig
from moe.model import Qwen2MoEForCausalLM
from train import checkpoint
from train import engine as ds
from train.comm import Comm

PROBE_SEED = 7


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(PROBE_SEED))


def main() -> None:
    ckpt, out = Path(sys.argv[1]), sys.argv[2]
    comm = Comm.init("cpu")
    cfg = ModelConfig(**json.loads((ckpt / "meta.json").read_text())["model_config"])
    model = Qwen2MoEForCausalLM(cfg)
    group = ds.shard_experts(model, 1)
    eng = ds.build_engine(
        model,
        ep_group_name=group,
        ep_size=1,
        num_experts=cfg.num_experts,
        lr=1e-3,
        weight_decay=0.0,
        zero_stage=1,
        micro_batch_size=1,
    )
    checkpoint.load(eng, model, ckpt, comm)
    model.eval()
    with torch.no_grad():
        torch.save(model(probe_ids(cfg.vocab_size)).logits, out)


if __name__ == "__main__":
    main()
