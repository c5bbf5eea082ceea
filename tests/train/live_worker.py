"""Trains with the real `Trainer` (the configuration composed as `python -m train` composes it), then
writes the logits of the model *in memory* on fixed probe ids: the reference an export must reproduce
without passing through the checkpoint reader. Every rank runs the probe forward (the expert all-to-all
needs all of them); rank 0 writes.

Usage (through the deepspeed launcher with --no_local_rank, or alone):
    python -m tests.train.live_worker OUT.pt override [override ...]
"""

from __future__ import annotations

import sys

import torch

from cli import run_without_finalizing

PROBE_SEED = 1234


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(PROBE_SEED))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from train.__main__ import CONFIG_DIR
    from train.config import TrainConfig

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("train", overrides=overrides))


def main() -> None:
    from train.trainer import Trainer

    out, *overrides = sys.argv[1:]
    trainer = Trainer(compose(overrides))
    trainer.fit()
    trainer.engine.eval()
    with torch.no_grad():
        ids = probe_ids(trainer.mcfg.vocab_size).to(trainer.device)
        logits = trainer.engine(input_ids=ids).logits.float().cpu()
    if trainer.rank == 0:
        torch.save(logits, out)
    trainer.comm.barrier()


if __name__ == "__main__":
    run_without_finalizing(main)  # the process groups must not meet interpreter finalization
