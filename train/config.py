"""Typed schemas of a training run. Hydra fills them from `configs/train.yaml` and its groups.

Every `validate()` raises ValueError naming the offending field, before any model is built.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from data.config import DataConfig
from moe.config import ModelConfig
from moe.experts import check_grouped_mm_alignment


class ScheduleKind(str, enum.Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr
    constant = "constant"  # linear warmup, then constant
    step = "step"  # DeepSeekMoE: linear warmup, x0.316 at 80% and again at 90% of the steps


class BalanceScope(str, enum.Enum):
    micro_batch = "micro_batch"  # transformers' definition: one micro-batch, pooled over layers
    sequence = "sequence"  # one loss per sequence, averaged
    global_batch = "global_batch"  # expert counts summed over DP ranks (and GA steps so far)


class GradDtype(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class WandbMode(str, enum.Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases, norms and the router's bias)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0")


@dataclass(kw_only=True)
class ScheduleConfig:
    kind: ScheduleKind = ScheduleKind.cosine
    """cosine | constant | step."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0."""
    min_lr_ratio: float = 0.1
    """Final LR of the cosine schedule, as a fraction of the peak."""

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage: 0, 1 or 2."""
    bf16: bool | None = None
    """bf16 mixed precision: bf16 weights, activations and gradients; fp32 router, losses, master weights
    and Adam moments. null (the presets' default): bf16 on CUDA, fp32 on CPU. true/false force it on
    any device; true on CPU really runs bf16 (DeepSpeed's CPU accelerator), which is how CI exercises
    the GPU's dtype flow."""
    grad_accum_dtype: GradDtype = GradDtype.fp32
    """With bf16: the dtype in which gradients are accumulated over micro-batches and reduced over
    ranks. fp32 (default) keeps small micro-batch contributions that bf16's 8-bit mantissa drops."""
    micro_batch_size: int = 4
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size * grad_accum * data-parallel world size."""

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.micro_batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("deepspeed.micro_batch_size and deepspeed.grad_accum must be positive")
        if self.zero_stage == 0 and self.bf16:
            raise ValueError(
                "deepspeed.zero_stage=0 with deepspeed.bf16=true is not supported (DeepSpeed has no ZeRO-0 "
                "bf16 path with fp32 gradient accumulation and expert groups); use deepspeed=zero1 or zero2"
            )
        GradDtype(self.grad_accum_dtype)


@dataclass(kw_only=True)
class ParallelConfig:
    ep_size: int = 1
    """Expert-parallel ranks; divides the world size and num_experts."""


@dataclass(kw_only=True)
class MoETrainConfig:
    balance_scope: BalanceScope = BalanceScope.micro_batch
    """Over which tokens the load-balancing loss counts expert assignments."""
    bias_update_rate: float = 0.0
    """DeepSeek-V3 auxiliary-loss-free balancing: per-step bias change towards balance; 0 disables."""


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: WandbMode = WandbMode.offline
    """offline | online | disabled."""
    project: str = "finemoe"
    """wandb project."""
    name: str | None = None
    """wandb run name (default: the run directory's name)."""
    log_every: int = 1
    """Optimizer steps between metric records."""
    heatmap_every: int = 50
    """Optimizer steps between expert-load heatmaps (and at the end)."""
    progress: bool = True
    """Console progress bar on rank 0."""
    peak_tflops: float | None = None
    """Device bf16 peak for MFU (TFLOP/s); default: looked up from the GPU name, none on CPU."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 100
    """Optimizer steps between checkpoints; 0 saves only at the end and on SIGTERM/SIGINT."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """auto (newest complete checkpoint in run_dir, if any) | none | <checkpoint directory>."""
    save_at_end: bool = True


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    run_dir: str = "runs/default"
    """Checkpoints, metrics.jsonl, the resolved config and wandb files go here."""
    init_from: str | None = None
    """Hugging Face checkpoint directory to start from (dense, or `python -m upcycle` output)."""
    max_steps: int = 100
    """Optimizer steps."""
    seed: int = 0
    """Seeds model init, data order and dropout-free RNG state."""
    eval_every: int = 0
    """Optimizer steps between held-out evaluations; 0 disables."""
    eval_batches: int = 8
    """Micro-batches per evaluation."""
    eval_at_start: bool = False
    """Also evaluate before the first step of a fresh run (logged at step 0, 0 tokens): the starting
    loss of an upcycled model, i.e. its head start. Needs `eval_every` > 0."""
    max_nonfinite_in_a_row: int = 5
    """Steps with a non-finite loss or gradient are skipped; this many in a row stops the run."""
    device: str = "auto"
    """auto | cpu | cuda."""
    stop_at_step: int | None = None
    """Stop after this step with a checkpoint, as a preemption would (scheduled pauses, tests)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (saves activation memory)."""

    def uses_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    def uses_bf16(self) -> bool:
        """`deepspeed.bf16`, with null resolved for the run's device (bf16 on CUDA, fp32 on CPU)."""
        if self.deepspeed.bf16 is None:
            return self.uses_cuda() and self.deepspeed.zero_stage > 0
        return self.deepspeed.bf16

    def validate(self, world_size: int = 1) -> TrainConfig:
        """Check everything that can be checked before building a model."""
        if self.init_from is None:
            self.model.validate()
            if self.model.is_moe:
                dtype = torch.bfloat16 if self.uses_bf16() else torch.float32
                check_grouped_mm_alignment(self.model.hidden_size, self.model.moe_intermediate_size, dtype)
        for part in (self.optim, self.schedule, self.deepspeed):
            part.validate()
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        ep = self.parallel.ep_size
        if ep <= 0 or world_size % ep:
            raise ValueError(f"parallel.ep_size={ep} must divide the world size {world_size}")
        if self.init_from is None and ep > 1 and self.model.num_experts % ep:
            raise ValueError(f"parallel.ep_size={ep} must divide model.num_experts={self.model.num_experts}")
        ds = self.deepspeed
        if (
            ds.global_batch_size is not None
            and ds.global_batch_size != ds.micro_batch_size * ds.grad_accum * world_size
        ):
            raise ValueError(
                f"deepspeed.global_batch_size={ds.global_batch_size} != micro_batch_size={ds.micro_batch_size} x "
                f"grad_accum={ds.grad_accum} x world={world_size}"
            )
        if self.checkpoint.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if self.moe.bias_update_rate < 0:
            raise ValueError(f"moe.bias_update_rate must be >= 0, got {self.moe.bias_update_rate}")
        if self.eval_at_start and self.eval_every <= 0:
            raise ValueError("eval_at_start=true needs eval_every > 0 (it names the eval batches to score)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        return self
