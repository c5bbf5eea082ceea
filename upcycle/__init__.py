"""Upcycle dense Qwen2 checkpoints into fine-grained Qwen2-MoE checkpoints (docs/upcycling.md)."""

from upcycle.config import (
    CalibrationConfig,
    MoEShape,
    ReinitIndices,
    RouterInit,
    SplitGating,
    SplitMethod,
    Strategy,
    UpcycleConfig,
)
from upcycle.plan import UpcyclePlan, make_plan, plan_config
from upcycle.run import upcycle

__all__ = [
    "CalibrationConfig",
    "MoEShape",
    "ReinitIndices",
    "RouterInit",
    "SplitGating",
    "SplitMethod",
    "Strategy",
    "UpcycleConfig",
    "UpcyclePlan",
    "make_plan",
    "plan_config",
    "upcycle",
]
