"""Learning-rate multipliers (of the peak LR) as a function of the optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable

from train.config import ScheduleConfig, ScheduleKind

STEP_DECAY = 0.316  # DeepSeekMoE: LR x0.316 at 80% and again at 90% of training


def lr_lambda(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """`step -> multiplier`; step 0 is the first optimizer step (LR = 1/(warmup+1) of peak when warming up)."""
    warmup = cfg.warmup_steps

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.kind is ScheduleKind.constant:
            return 1.0
        if cfg.kind is ScheduleKind.step:
            if step >= 0.9 * total_steps:
                return STEP_DECAY**2
            if step >= 0.8 * total_steps:
                return STEP_DECAY
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
