"""The callback protocol: the trainer calls these hooks on rank 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class Callback:
    def on_start(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        """Before the first step (after a resume, `start_step` > 0)."""

    def on_resume(self, step: int, changed: dict[str, tuple[Any, Any]]) -> None:
        """Before `on_start` of a resumed run: the config keys it changes, `{key: (old, new)}`."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars of one optimizer step (or an evaluation)."""

    def on_expert_load(self, step: int, fraction_LE: torch.Tensor, png: Path) -> None:
        """Fraction of tokens per (MoE layer, expert), and the heatmap written to `png`."""

    def on_end(self) -> None:
        """After the last step or on a stop."""
