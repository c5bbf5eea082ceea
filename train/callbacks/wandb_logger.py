"""wandb logging (the only module that imports wandb). Offline by default; keys grouped train/ moe/ perf/ eval/."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import torch

from train.callbacks.base import Callback


class WandbLogger(Callback):
    def __init__(self, mode: str, project: str, name: str | None):
        self.mode, self.project, self.name = mode, project, name
        self.run: Any = None

    def on_start(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        import wandb

        self.run = wandb.init(
            project=self.project,
            name=self.name or run_dir.name,
            dir=str(run_dir),
            mode=self.mode,  # type: ignore[arg-type]
            config=config,
            id=_run_id(run_dir, fresh=start_step == 0),
            resume="allow",
        )

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def on_expert_load(self, step: int, fraction_LE: torch.Tensor, png: Path) -> None:
        import wandb

        self.run.log({"moe/expert_load_heatmap": wandb.Image(str(png))}, step=step)

    def on_end(self) -> None:
        if self.run is not None:
            self.run.finish()


def _run_id(run_dir: Path, fresh: bool) -> str:
    """The wandb run id of `run_dir`: kept by a resume, so it continues the same wandb run; new for a
    fresh start, so a second run in a used directory is not merged into the first. (A resume from an
    older checkpoint re-logs steps wandb already has, which wandb ignores: metrics.jsonl holds them.)"""
    path = run_dir / "wandb_id.txt"
    if fresh or not path.exists():
        path.write_text(secrets.token_hex(6))
    return path.read_text().strip()
