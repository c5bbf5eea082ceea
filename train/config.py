"""Typed schemas of a training run. Hydra fills them from `configs/train.yaml` and its groups.

Every `validate()` raises ValueError naming the offending field (FileNotFoundError for a missing
file), before any process group, model or data is built. `TrainConfig.validate` takes the world size
from the launcher's environment (`launcher_world_size`), so world-dependent rules are checked then too.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data.config import BUILTIN, DataConfig
from moe.config import ModelConfig
from moe.experts import check_grouped_mm_alignment

if TYPE_CHECKING:
    from train.memory import MemoryConfig


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

    def warnings(self, max_steps: int) -> list[str]:
        """A warmup that the run's length leaves no room for (allowed: short smoke runs do this)."""
        warmup = self.warmup_steps
        if warmup >= max_steps:
            peak = max_steps / (warmup + 1)
            return [
                f"schedule.warmup_steps={warmup} >= max_steps={max_steps}: the LR reaches only {peak:.0%} "
                "of optim.lr and never decays"
            ]
        if self.kind is ScheduleKind.step and warmup >= 0.8 * max_steps:
            return [
                f"schedule.warmup_steps={warmup} >= 80% of max_steps={max_steps}: the step schedule's "
                "first decay falls inside the warmup, so the LR never holds its peak and drops from the "
                "end of the warmup straight to a decayed value"
            ]
        return []


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
    overlap_comm: bool = False
    """ZeRO-2 only: reduce each full gradient bucket on a side stream while backward goes on (DeepSpeed's
    `overlap_comm`, which its ZeRO-2 examples turn on), for a second bucket of memory (1 GB in bf16 at
    the default size). Off until a GPU measurement says what it gains here."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction bucket of DeepSpeed's ZeRO optimizer (`reduce_bucket_size`, whose
    default this is): ZeRO-2, and ZeRO-1 without bf16 or with `grad_accum_dtype=bf16`. Ignored by
    ZeRO-1 with bf16 and fp32 accumulation (DeepSpeed's BF16_Optimizer: fixed 5e8-element all-reduce
    buckets). The bucket is allocated whatever the model size (1 GB in bf16) plus its reduction copy
    (`python -m train.memory memory.reduce_bucket_size=N`)."""

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.micro_batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("deepspeed.micro_batch_size and deepspeed.grad_accum must be positive")
        if self.overlap_comm and self.zero_stage != 2:
            raise ValueError(
                f"deepspeed.overlap_comm=true needs deepspeed.zero_stage=2, got {self.zero_stage} (ZeRO-1 "
                "with bf16 and fp32 accumulation ignores it; the other paths are not tested)"
            )
        if self.reduce_bucket_size <= 0:
            raise ValueError(f"deepspeed.reduce_bucket_size must be positive, got {self.reduce_bucket_size}")
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
    """DeepSeek-V3 auxiliary-loss-free balancing: the per-step change, in router-logit units, of each
    expert's selection bias towards balance (working range 0.003-0.03, docs/balancing.md); 0 disables."""


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
    dist_timeout_s: float = 1800.0
    """How long a collective waits for the other ranks before the process group gives up and the job
    ends (a dead or stuck rank, e.g. one lost on another node, which no launcher there can see)."""
    stop_at_step: int | None = None
    """Stop after this step with a checkpoint, as a preemption would (scheduled pauses, tests)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (saves activation memory)."""
    loss_chunk_tokens: int = 0
    """> 0: form the loss this many tokens at a time (`moe.model.chunked_cross_entropy`), each chunk's
    logits recomputed in backward. The loss's vocabulary-wide tensors (14 V bytes per token: 34.9 GB per
    rank for A2.7B at 4 x 4096 tokens) shrink to one chunk's (6 V bytes per token in bf16) plus an fp32
    sum of the LM head's gradient (4 V H bytes), for one more LM-head matmul per token. 0: the whole
    micro-batch at once. `python -m train.memory memory.loss_chunk_tokens=N` shows the effect."""

    def uses_cuda(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    def uses_bf16(self) -> bool:
        """`deepspeed.bf16`, with null resolved for the run's device (bf16 on CUDA, fp32 on CPU)."""
        if self.deepspeed.bf16 is None:
            return self.uses_cuda() and self.deepspeed.zero_stage > 0
        return self.deepspeed.bf16

    def model_config(self) -> ModelConfig:
        """The model this run trains, validated: `model`, or with `init_from` that checkpoint's
        config.json with this run's `expert_backend` and loss coefficients (as `build_model` loads it)."""
        if self.init_from is None:
            return self.model.validate()
        from moe.hf import read_config

        try:
            base, _ = read_config(self.init_from)
            return base.replace(
                expert_backend=self.model.expert_backend,
                router_aux_loss_coef=self.model.router_aux_loss_coef,
                router_z_loss_coef=self.model.router_z_loss_coef,
            ).validate()
        except ValueError as e:
            raise ValueError(f"init_from={self.init_from!r}: {e}") from None

    def validate(self, world_size: int = 1) -> TrainConfig:
        """Check everything that can be checked before building a process group, model or data.

        Reads `init_from`'s config.json and checks that local data paths exist (no data is read).
        """
        model = self.model_config()
        if model.is_moe:
            dtype = torch.bfloat16 if self.uses_bf16() else torch.float32
            check_grouped_mm_alignment(model.hidden_size, model.moe_intermediate_size, dtype)
        for part in (self.optim, self.schedule, self.deepspeed, self.data):
            part.validate()
        check_device(self.device)
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 0 (0: no chunks), got {self.loss_chunk_tokens}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be positive, got {self.dist_timeout_s}")
        if self.stop_at_step is not None and self.stop_at_step <= 0:
            raise ValueError(f"stop_at_step must be positive or null, got {self.stop_at_step}")
        ep = self.parallel.ep_size
        if ep <= 0 or world_size % ep:
            raise ValueError(f"parallel.ep_size={ep} must divide the world size {world_size}")
        if ep > 1 and model.num_experts % ep:
            origin = f" (from init_from={self.init_from})" if self.init_from else ""
            raise ValueError(
                f"parallel.ep_size={ep} must divide model.num_experts={model.num_experts}{origin}"
            )
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
        if self.checkpoint.every < 0:
            raise ValueError(
                f"checkpoint.every must be >= 0 (0: only at the end), got {self.checkpoint.every}"
            )
        if not self.checkpoint.resume:
            raise ValueError("checkpoint.resume must be auto, none or a checkpoint directory, got ''")
        if self.moe.bias_update_rate < 0:
            raise ValueError(f"moe.bias_update_rate must be >= 0, got {self.moe.bias_update_rate}")
        for name in ("log_every", "heatmap_every"):
            if getattr(self.logging, name) < 1:
                raise ValueError(f"logging.{name} must be >= 1, got {getattr(self.logging, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 disables evaluation), got {self.eval_every}")
        if self.eval_every and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {self.eval_batches}")
        if self.eval_every and self.data.eval_fraction == 0:
            raise ValueError(
                "eval_every > 0 needs data.eval_fraction > 0 (data.eval_fraction=0 holds nothing out)"
            )
        if self.eval_at_start and self.eval_every <= 0:
            raise ValueError("eval_at_start=true needs eval_every > 0 (it names the eval batches to score)")
        if self.max_nonfinite_in_a_row < 1:
            raise ValueError(f"max_nonfinite_in_a_row must be >= 1, got {self.max_nonfinite_in_a_row}")
        self._check_data_paths()
        return self

    def _check_data_paths(self) -> None:
        """Local data that does not exist fails now, not after the model is built (no data is read)."""
        data = self.data
        if data.prepared_dir is not None:
            if not Path(data.prepared_dir).expanduser().is_dir():
                raise FileNotFoundError(
                    f"data.prepared_dir={data.prepared_dir!r}: no such directory (write it with "
                    "python -m data.prepare and the same data config)"
                )
            return
        from data.sources import data_files  # the loader's own rule: file, directory, glob or Hub name

        for i, src in enumerate(data.sources):
            path = os.path.expanduser(src.path)
            if src.path != BUILTIN and not os.path.isdir(path):  # directories: possibly save_to_disk
                data_files(path, f"data.sources[{i}] (path={src.path!r})")

    def warnings(
        self, model: ModelConfig, world_size: int = 1, gpu_memory_bytes: int | None = None
    ) -> list[str]:
        """What is allowed but probably not meant, for `model` (`model_config()`) on `world_size` ranks
        with GPUs of `gpu_memory_bytes` (None: no GPU, no memory plan)."""
        out = []
        if gpu_memory_bytes is not None:
            out += self._memory_warning(model, world_size, gpu_memory_bytes)
        out += self.schedule.warnings(self.max_steps)
        if self.data.seq_len > model.max_position_embeddings:
            origin = f"init_from {self.init_from}'s config.json" if self.init_from else "model"
            out.append(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                f"{model.max_position_embeddings} (from {origin}): the exported config.json will claim "
                f"max_position_embeddings={model.max_position_embeddings}, shorter than the sequences "
                "trained on"
                + ("" if self.init_from else f"; set model.max_position_embeddings={self.data.seq_len}")
            )
        return out

    def memory_config(
        self, model: ModelConfig, world_size: int, gpu_memory_bytes: float = 80e9
    ) -> MemoryConfig:
        """This run's layout of `model` (`model_config()`) as `train.memory` plans it."""
        from train.memory import MemoryConfig

        return MemoryConfig(
            world_size=world_size,
            ep_size=self.parallel.ep_size if model.is_moe else 1,  # a dense model ignores ep_size
            zero_stage=self.deepspeed.zero_stage,
            bf16=self.uses_bf16(),
            grad_accum_dtype=self.deepspeed.grad_accum_dtype,
            micro_batch_size=self.deepspeed.micro_batch_size,
            seq_len=self.data.seq_len,
            activation_checkpointing=self.activation_checkpointing,
            loss_chunk_tokens=self.loss_chunk_tokens,
            gpu_memory_gb=gpu_memory_bytes / 1e9,
            reduce_bucket_size=self.deepspeed.reduce_bucket_size,
            overlap_comm=self.deepspeed.overlap_comm,
        )

    def _memory_warning(self, model: ModelConfig, world_size: int, gpu_memory_bytes: int) -> list[str]:
        from train.memory import GB, memory_hints, plan

        mem = self.memory_config(model, world_size, gpu_memory_bytes)
        try:
            total = plan(model, mem).total
        except ValueError:  # a layout the planner does not model: no warning (a warning never stops a run)
            return []
        if total <= gpu_memory_bytes:
            return []
        hints = "; ".join(memory_hints(model, mem, prefix=""))
        return [
            f"the memory plan of this run is {total / GB:.2f} GB per rank, more than this GPU's "
            f"{gpu_memory_bytes / GB:.2f} GB (python -m train.memory shows the parts)"
            + (f"; {hints}" if hints else "")
        ]


def check_device(name: str) -> None:
    """`device` names auto, cpu or cuda, and cuda only where CUDA is available (`TrainConfig.validate`
    and `train.comm.bind_device`)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available")


def launcher_world_size() -> int:
    """The number of training processes, known before the process group exists: the size of an
    existing process group, else the launcher's WORLD_SIZE (torchrun, deepspeed, SLURM via
    launch/), else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"the environment's WORLD_SIZE={value!r} is not a positive integer")
    return int(value)
