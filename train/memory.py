"""`python -m train.memory model=<preset> memory.world_size=8 memory.ep_size=4 ...`: bytes per rank of a run.

Pure arithmetic on the model config (no DeepSpeed import, nothing allocated). It models what
`train.engine.build_engine` makes DeepSpeed 0.19.8 allocate on each rank, tensor by tensor, and the
activations of one micro-batch. The last printed line is machine-readable: `per_rank_GB <X>` (decimal
GB, 1e9 bytes; the total with the chosen `memory.activation_checkpointing`).

Model and optimizer state. Per optimizer group g: N_g parameters on this rank (a rank holds
num_experts/ep experts), D_g ranks sharing its ZeRO state (data parallel, W ranks, for dense
parameters; expert data parallel, W/ep ranks, for routed experts), A_g = N_g rounded up to a multiple
of 2*D_g (the padded flat buffer), P_g = A_g/D_g (one rank's partition); lp = 2 bytes with bf16, else 4.
Sums run over the groups:

    DeepSpeed optimizer (chosen when)              weights  gradients (peak)                     master  Adam
    none, torch AdamW (ZeRO-0, fp32 only)          4 sum N  4 sum N (.grad)                      0       8 sum N
    BF16_Optimizer (ZeRO-1, bf16, fp32 acc.)       2 sum A  4 sum A (fp32 accumulators for the   4 sum P 8 sum P
                                                            whole model) + 2 max N_p (the .grad
                                                            its hook is moving, largest tensor)
    DeepSpeedZeroOptimizer (ZeRO-2, bf16, fp32)    2 sum A  4 sum P (fp32 gradient partitions)   4 sum P 8 sum P
    DeepSpeedZeroOptimizer (bf16 acc., or fp32)    lp sum A C + 4 P_g at group g's step; ZeRO-1  4 sum P 8 sum P
                                                            also lp sum N (.grad before reduction)

BF16_Optimizer's per-parameter hook (`build_engine` sets `bf16.immediate_grad_update`) adds each
bf16 .grad to the fp32 accumulators and frees it. C (`grads_in_partition`, lp bytes per element) holds
the reduced gradients of every parameter that overlaps this rank's partitions, counted whole; at the
step of group g its partition is cast to fp32 while C lives on for the later groups. ZeRO-1 shards the optimizer state and master weights, ZeRO-2
the gradients too, ZeRO-0 nothing. Groups are `train.engine.optimizer_groups`: decay (matrices),
no-decay (biases, norms), then the experts split by DeepSpeed's
`split_params_into_different_moe_groups_for_optimizer` into chunks of at most 178,956,971 elements.
The reduce buffers are the ZeRO optimizer's IPG bucket (`reduce_bucket_size` elements of the weights'
dtype, allocated at every backward whatever the model size; two with ZeRO-2's `overlap_comm`) plus the
largest flattened all-reduce copy in the communication dtype (ZeRO-0 and BF16_Optimizer: the engine's
buckets of 5e8 elements; a bucket of one tensor is not copied). A ZeRO-1/2 bucket's fill (and
ZeRO-1's first fill, below) depends on the order in which autograd hands over the gradients: exact
when one bucket holds every gradient (as DeepSpeed's default 5e8 does up to that many local
parameters); otherwise the reduction copy is counted as a whole bucket (an upper bound) and the first
fill follows parameter order (an estimate). Not counted: the short-lived low-precision copies inside
those casts and flattens, the CUDA context, NCCL buffers, and allocator fragmentation (keep several
GB of headroom).

Activations of one micro-batch (b sequences of s tokens: bytes per token times b*s; a: bytes of an
activation, 2 with bf16; h hidden, n query heads, g key/value heads, d head dim, k experts per token,
E routed experts, I routed-expert width, I_s shared-expert width, I_d dense MLP width, V vocab). The
Korthikanti et al. 2022 (arXiv:2205.05198) count of the tensors autograd saves for backward, redone for
this model (GQA, RoPE, SwiGLU, top-k routed experts + gated shared expert, fp32 router and RMSNorm, no
dropout), with a fused SDPA kernel (no s x s tensor) and balanced routing (each expert-parallel rank
receives k*b*s rows). A test checks it against the tensors saved by the real model on CPU.

    RMSNorm (2 per layer + final)  4h + 2ah + 4        fp32 input, rstd; normalised (cast), output
    attention                      2ah + 2agd + 4n     q, k after RoPE, v; output; fp32 log-sum-exp
    router (MoE layers)            [4h] + 8E + 12k     fp32 input (bf16 only); fp32 logits, probs; top-k
    routed experts                 ak(3h + 4I + 1) + 16k   rows in, gate|up, silu, product, rows out,
                                                       weighted rows; row weights; int64 orders
    shared expert + gate           4aI_s + ah + a      (without one, bf16 saves the normed input: -ah)
    dense MLP layers               4aI_d
    once                           8 + 2ad             token ids, RoPE cos/sin
    LM head                        aV + 4V + 8V        logits; fp32 log-softmax (saved); in backward, the
                                                       fp32 gradients of the loss and of the log-softmax

With `loss_chunk_tokens` = C > 0 (`moe.model.chunked_cross_entropy`) the LM head's vocabulary-wide
tensors exist for one chunk at a time (the logits in the model dtype and one fp32 copy, recomputed in
backward): C (aV + 4V) bytes per micro-batch instead of b s (aV + 12V), or, with bf16, while a chunk's
weight-gradient product is formed, aVH + C aV if larger; plus, with bf16, the fp32 sum of the head's
weight gradient over chunks (4VH). In fp32: C 4V (no copy, no product).

With activation checkpointing (each decoder layer recomputed in backward) a layer keeps only its input
(ah) and, in MoE layers, its router's outputs (8E + 12k); the largest layer is live once more while it
is recomputed; the LM head is not checkpointed. A document-boundary attention mask adds b*s*s bytes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moe.config import ModelConfig
from moe.params import CONFIG_DIR
from train.config import GradDtype

MOE_GROUP_MAX_NUMEL = 178_956_971
"""`deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`'s max_group_size."""
ENGINE_ALLREDUCE_NUMEL = 500_000_000
"""The engine's all-reduce bucket (`MEMORY_OPT_ALLREDUCE_SIZE`): ZeRO-0 and BF16_Optimizer."""
ALIGNMENT = 2
"""DeepSpeed's `nccl_start_alignment_factor`: flat buffers are padded to a multiple of 2 * group size."""
GB = 1e9


@dataclass(kw_only=True)
class MemoryConfig:
    """One training layout, as `python -m train` would run it (`deepspeed.*`, `parallel.*`, `data.*`)."""

    world_size: int = 8
    """Ranks (GPUs) in total."""
    ep_size: int = 1
    """Expert-parallel ranks; divides world_size and model.num_experts."""
    zero_stage: int = 2
    """ZeRO stage: 0, 1 or 2."""
    bf16: bool = True
    """bf16 weights, gradients and activations (fp32 master weights and Adam moments)."""
    grad_accum_dtype: GradDtype = GradDtype.fp32
    """With bf16: dtype of gradient accumulation and reduction (`train.engine.build_engine`'s)."""
    micro_batch_size: int = 4
    """Sequences per rank per forward pass."""
    seq_len: int = 4096
    """Tokens per sequence."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward; decides which activation figure enters the total."""
    loss_chunk_tokens: int = 0
    """The loss this many tokens at a time (the trainer's `loss_chunk_tokens`); 0: whole micro-batch."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU (decimal GB) that the total is checked against."""
    reduce_bucket_size: int = 500_000_000
    """DeepSpeed's zero_optimization.reduce_bucket_size in elements (the trainer's
    `deepspeed.reduce_bucket_size`)."""
    overlap_comm: bool = False
    """ZeRO-2's `overlap_comm` (the trainer's `deepspeed.overlap_comm`): a second reduction bucket."""

    def validate(self, model: ModelConfig) -> MemoryConfig:
        """Raise ValueError naming the first offending field. Returns self."""
        for name in ("world_size", "ep_size", "micro_batch_size", "seq_len", "reduce_bucket_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"memory.{name} must be >= 1, got {getattr(self, name)}")
        if self.overlap_comm and self.zero_stage != 2:
            raise ValueError(f"memory.overlap_comm=true needs memory.zero_stage=2, got {self.zero_stage}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"memory.loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")
        if self.gpu_memory_gb <= 0:
            raise ValueError(f"memory.gpu_memory_gb must be positive, got {self.gpu_memory_gb}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"memory.zero_stage must be 0, 1 or 2 (train.engine), got {self.zero_stage}")
        if self.zero_stage == 0 and self.bf16:
            raise ValueError(
                "memory.zero_stage=0 with memory.bf16=true is refused by train.engine; use 1 or 2"
            )
        try:
            GradDtype(self.grad_accum_dtype)
        except ValueError:
            raise ValueError(
                f"memory.grad_accum_dtype must be fp32 or bf16, got {self.grad_accum_dtype!r}"
            ) from None
        if self.world_size % self.ep_size:
            raise ValueError(f"memory.ep_size={self.ep_size} must divide memory.world_size={self.world_size}")
        if not model.is_moe and self.ep_size > 1:
            raise ValueError(f"memory.ep_size={self.ep_size} needs a MoE model (model.num_experts is 0)")
        if model.is_moe and model.num_experts % self.ep_size:
            raise ValueError(
                f"memory.ep_size={self.ep_size} must divide model.num_experts={model.num_experts}"
            )
        return self

    @property
    def optimizer(self) -> str:
        """The DeepSpeed optimizer wrapper build_engine ends up with."""
        if self.zero_stage == 0:
            return "none"
        if self.zero_stage == 1 and self.bf16 and self.grad_accum_dtype == GradDtype.fp32:
            return "BF16_Optimizer"
        return "DeepSpeedZeroOptimizer"


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    """Elements on one rank (a routed-expert tensor holds num_experts/ep_size experts)."""
    ndim: int
    expert: bool


def parameters(cfg: ModelConfig, ep_size: int = 1) -> list[Param]:
    """One rank's parameters in `Qwen2MoEForCausalLM.parameters()` order (tied LM head once)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    out = [Param("model.embed_tokens.weight", cfg.vocab_size * h, 2, False)]

    def add(name: str, shape: tuple[int, ...], expert: bool = False) -> None:
        out.append(Param(name, math.prod(shape), len(shape), expert))

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", (h,))
        for proj, rows in (("q", h), ("k", kv), ("v", kv)):
            add(p + f"self_attn.{proj}_proj.weight", (rows, h))
            add(p + f"self_attn.{proj}_proj.bias", (rows,))
        add(p + "self_attn.o_proj.weight", (h, h))
        add(p + "post_attention_layernorm.weight", (h,))
        if cfg.is_moe_layer(i):
            e, inter = cfg.num_experts // ep_size, cfg.moe_intermediate_size
            add(p + "mlp.gate.weight", (cfg.num_experts, h))
            add(p + "mlp.experts.gate_up_proj", (e, 2 * inter, h), expert=True)
            add(p + "mlp.experts.down_proj", (e, h, inter), expert=True)
            if cfg.shared_expert_intermediate_size:
                s = cfg.shared_expert_intermediate_size
                for proj, shape in (("gate", (s, h)), ("up", (s, h)), ("down", (h, s))):
                    add(p + f"mlp.shared_expert.{proj}_proj.weight", shape)
                add(p + "mlp.shared_expert_gate.weight", (1, h))
        else:
            d = cfg.intermediate_size
            for proj, shape in (("gate", (d, h)), ("up", (d, h)), ("down", (h, d))):
                add(p + f"mlp.{proj}_proj.weight", shape)
    add("model.norm.weight", (h,))
    if not cfg.tie_word_embeddings:
        add("lm_head.weight", (cfg.vocab_size, h))
    return out


@dataclass(frozen=True)
class Group:
    """One optimizer parameter group: DeepSpeed flattens, pads and partitions each separately."""

    numels: tuple[int, ...]
    dp_size: int
    """Ranks sharing its ZeRO state: data parallel (dense) or expert data parallel (experts)."""
    expert: bool

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def flat(self) -> int:
        """Elements of the padded flat buffer."""
        align = ALIGNMENT * self.dp_size
        return -(-self.numel // align) * align

    @property
    def partition(self) -> int:
        return self.flat // self.dp_size

    def in_partition(self, index: int) -> int:
        """Elements of the parameters that overlap partition `index`, counted whole."""
        lo, hi = index * self.partition, (index + 1) * self.partition
        total = offset = 0
        for n in self.numels:
            if offset < hi and offset + n > lo:
                total += n
            offset += n
        return total


def optimizer_groups(params: list[Param], world_size: int, ep_size: int) -> list[Group]:
    """`train.engine.optimizer_groups` after DeepSpeed's MoE split, empty groups dropped."""
    dense = [p for p in params if not p.expert]
    groups = [
        Group(tuple(p.numel for p in dense if p.ndim >= 2), world_size, False),
        Group(tuple(p.numel for p in dense if p.ndim < 2), world_size, False),
    ]
    for decay in (True, False):
        chunk: list[int] = []
        for p in params:
            if not p.expert or (p.ndim >= 2) != decay:
                continue
            if chunk and sum(chunk) + p.numel > MOE_GROUP_MAX_NUMEL:
                groups.append(Group(tuple(chunk), world_size // ep_size, True))
                chunk = []
            chunk.append(p.numel)
        if chunk:
            groups.append(Group(tuple(chunk), world_size // ep_size, True))
    return [g for g in groups if g.numels]


def _largest_flatten_copy(sizes: list[int], bucket: int) -> int:
    """Largest copy `allreduce_no_retain` flattens: buckets close once they pass `bucket` elements."""
    largest = 0
    current: list[int] = []
    for n in sizes:
        current.append(n)
        if sum(current) > bucket:
            largest = max(largest, sum(current) if len(current) > 1 else 0)
            current = []
    if len(current) > 1:
        largest = max(largest, sum(current))
    return largest


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one rank."""

    weights: int
    gradients: int
    master: int
    optimizer: int
    """Adam's two fp32 moments."""
    reduce_buffers: int
    activations: int
    activations_checkpointed: int
    activation_checkpointing: bool

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.master + self.optimizer + self.reduce_buffers

    @property
    def total(self) -> int:
        return self.states + (
            self.activations_checkpointed if self.activation_checkpointing else self.activations
        )


@dataclass(frozen=True)
class Activations:
    """Bytes per token of a micro-batch (formula in the module docstring)."""

    layers: tuple[int, ...]
    """Saved for backward by each decoder layer."""
    kept: tuple[int, ...]
    """Kept by each decoder layer under activation checkpointing: its input and its router's outputs."""
    fixed: int
    """Token ids, RoPE tables, and the LM head: final norm, logits, fp32 log-softmax."""
    head: int
    """The vocabulary-wide part of `fixed`: logits and fp32 log-softmax."""
    loss_transient: int
    """In backward, the fp32 gradients of the loss and of the log-softmax, next to the saved log-softmax."""
    chunk_row: int
    """Bytes per row of a loss chunk: its logits and (bf16) their fp32 copy."""
    chunk_fixed: int
    """Bytes of a chunked loss whatever the chunk: bf16's fp32 sum of the head's weight gradient."""
    chunk_product: tuple[int, int]
    """bf16: (fixed, per row) bytes while a chunk's weight-gradient product is formed (a V H + a C V)."""

    def per_token(self, checkpointing: bool) -> int:
        """Peak bytes per token; with checkpointing the largest layer is live again while recomputed."""
        layers = sum(self.kept) + max(self.layers, default=0) if checkpointing else sum(self.layers)
        return layers + self.fixed + self.loss_transient

    def micro_batch(self, tokens: int, checkpointing: bool, loss_chunk_tokens: int = 0) -> int:
        """Peak bytes of a micro-batch of `tokens`; with loss chunks the vocabulary-wide tensors are
        those of one chunk."""
        if loss_chunk_tokens <= 0:
            return tokens * self.per_token(checkpointing)
        vocab = self.head + self.loss_transient
        rows = min(loss_chunk_tokens, tokens)
        fixed, per_row = self.chunk_product
        chunk = max(rows * self.chunk_row, fixed + rows * per_row) + self.chunk_fixed
        return tokens * (self.per_token(checkpointing) - vocab) + chunk


def activations(cfg: ModelConfig, bf16: bool) -> Activations:
    """The activation terms of the module docstring, per token."""
    a = 2 if bf16 else 4
    h, d, g, n = cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
    e, k, v = cfg.num_experts, cfg.num_experts_per_tok, cfg.vocab_size
    norm = 4 * h + 2 * a * h + 4
    attention = 2 * a * h + 2 * a * g * d + 4 * n
    router_out = 8 * e + 12 * k
    layers, kept = [], []
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            mlp = (4 * h if bf16 else 0) + router_out
            mlp += a * k * (3 * h + 4 * cfg.moe_intermediate_size + 1) + 16 * k  # routed experts
            s = cfg.shared_expert_intermediate_size
            # the shared expert and its gate save the normed input; else, in bf16, nothing does
            # (the router saves its fp32 copy)
            mlp += 4 * a * s + a * h + a if s else (-a * h if bf16 else 0)
            kept.append(a * h + router_out)
        else:
            mlp = 4 * a * cfg.intermediate_size
            kept.append(a * h)
        layers.append(2 * norm + attention + mlp)
    head = a * v + 4 * v
    fixed = 8 + 2 * a * d + norm + head
    return Activations(
        layers=tuple(layers),
        kept=tuple(kept),
        fixed=fixed,
        head=head,
        loss_transient=8 * v,
        chunk_row=a * v + 4 * v if bf16 else 4 * v,
        chunk_fixed=4 * v * h if bf16 else 0,
        chunk_product=(a * v * h, a * v) if bf16 else (0, 0),
    )


def plan(cfg: ModelConfig, mem: MemoryConfig, rank: int | None = None) -> MemoryPlan:
    """Bytes of `rank` (default: the largest over ranks) for `cfg` trained with layout `mem`."""
    mem.validate(cfg)
    if rank is not None and not 0 <= rank < mem.world_size:
        raise ValueError(f"rank={rank} outside [0, memory.world_size={mem.world_size})")
    ranks = range(mem.world_size) if rank is None else [rank]
    params = parameters(cfg, mem.ep_size if cfg.is_moe else 1)
    groups = optimizer_groups(params, mem.world_size, mem.ep_size)
    lp = 2 if mem.bf16 else 4
    n_local = sum(p.numel for p in params)
    flat = sum(g.flat for g in groups)
    part = sum(g.partition for g in groups)
    dense_grads = [p.numel for p in params if not p.expert]
    expert_grads = [p.numel for p in params if p.expert]

    kind = mem.optimizer
    if kind == "none":  # torch AdamW on the fp32 parameters themselves; the engine all-reduces .grad
        weights, master, adam = 4 * n_local, 0, 8 * n_local
        gradients = 4 * n_local
        reduce = 4 * max(
            _largest_flatten_copy(s, ENGINE_ALLREDUCE_NUMEL) for s in (dense_grads, expert_grads)
        )
    else:
        weights, master, adam = lp * flat, 4 * part, 8 * part
        if kind == "BF16_Optimizer":  # fp32 accumulators as large as the whole model; each bf16 .grad
            gradients = 4 * flat + 2 * max(p.numel for p in params)  # is added and freed by its hook
            reduce = 4 * max(
                _largest_flatten_copy([g.flat for g in groups if g.expert == e], ENGINE_ALLREDUCE_NUMEL)
                for e in (False, True)
            )
        else:
            fp32_partitions = mem.bf16 and mem.grad_accum_dtype == GradDtype.fp32
            if fp32_partitions:  # reduced straight into fp32 partitions, stepped in place
                gradients = 4 * part
            else:
                gradients = max(_contiguous_peak(groups, r, mem, lp, n_local) for r in ranks)
            comm = 4 if not mem.bf16 or fp32_partitions else 2
            largest = min(mem.reduce_bucket_size, max(sum(dense_grads), sum(expert_grads)))
            buckets = 2 if mem.overlap_comm else 1  # overlap_comm: double-buffered
            reduce = buckets * lp * mem.reduce_bucket_size + comm * largest
    tokens, act = mem.micro_batch_size * mem.seq_len, activations(cfg, mem.bf16)
    return MemoryPlan(
        weights=weights,
        gradients=gradients,
        master=master,
        optimizer=adam,
        reduce_buffers=reduce,
        activations=act.micro_batch(tokens, False, mem.loss_chunk_tokens),
        activations_checkpointed=act.micro_batch(tokens, True, mem.loss_chunk_tokens),
        activation_checkpointing=mem.activation_checkpointing,
    )


def _contiguous_peak(groups: list[Group], rank: int, mem: MemoryConfig, lp: int, n_local: int) -> int:
    """DeepSpeedZeroOptimizer with gradients in the weights' dtype: the peak gradient bytes of `rank`.

    The reduced gradients of this rank's partitions live in one contiguous buffer; at the step of group
    i its gradient partition is flattened and cast to fp32 while the buffer lives on for the later
    groups. ZeRO-1 first holds every .grad until the boundary reduction drains them into the bucket.
    """
    index = [rank if not g.expert else rank // mem.ep_size for g in groups]
    held = [g.in_partition(i) for g, i in zip(groups, index)]
    contiguous = lp * sum(held)
    peak = contiguous
    for i, g in enumerate(groups):
        alive = contiguous if any(held[i + 1 :]) else 0
        peak = max(peak, alive + 4 * g.partition)
    if mem.zero_stage == 1:
        first_fill = 0
        for n in (n for g in groups for n in g.numels):
            if first_fill + n > mem.reduce_bucket_size:
                break
            first_fill += n
        peak = max(peak, lp * n_local, lp * (n_local - first_fill) + contiguous)
    return peak


# ---- the CLI ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MemoryJob:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model being trained."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The layout."""


def format_plan(cfg: ModelConfig, mem: MemoryConfig) -> str:
    """The table, the fit verdict, then `per_rank_GB <X>`."""
    p = plan(cfg, mem)
    n = cfg.num_params()["total"]
    params = parameters(cfg)
    experts = sum(q.numel for q in params if q.expert)
    lines = [
        f"model: {n / 1e9:.2f}B parameters ({(n - experts) / 1e9:.2f}B dense, {experts / 1e9:.2f}B routed experts)",
        f"layout: {mem.world_size} ranks, ep_size {mem.ep_size}"
        + (f" ({cfg.num_experts // mem.ep_size} of {cfg.num_experts} experts per rank)" if cfg.is_moe else "")
        + f", ZeRO-{mem.zero_stage}, {'bf16' if mem.bf16 else 'fp32'}"
        + (f", {GradDtype(mem.grad_accum_dtype).value} gradient accumulation" if mem.bf16 else "")
        + f"; DeepSpeed optimizer: {mem.optimizer}",
        f"ZeRO state sharded over: dense DP={mem.world_size}"
        + (f", experts EDP={mem.world_size // mem.ep_size}" if cfg.is_moe else ""),
    ]
    ckpt = mem.activation_checkpointing
    rows = [
        (f"weights ({'bf16' if mem.bf16 else 'fp32'})", p.weights),
        ("gradients (peak)", p.gradients),
        ("fp32 master weights", p.master),
        ("Adam states (2 x fp32)", p.optimizer),
        ("reduce buffers", p.reduce_buffers),
        (
            f"activations, {mem.micro_batch_size} x {mem.seq_len} tokens"
            + (f", loss in chunks of {mem.loss_chunk_tokens}" if mem.loss_chunk_tokens else "")
            + (" (in total)" if not ckpt else ""),
            p.activations,
        ),
        ("activations, checkpointed" + (" (in total)" if ckpt else ""), p.activations_checkpointed),
        (f"total (activation_checkpointing={'true' if ckpt else 'false'})", p.total),
    ]
    width = max(len(r[0]) for r in rows)
    lines.append(f"{'per rank':<{width}}  {'bytes':>16}  {'GB':>8}")
    lines += [f"{name:<{width}}  {b:>16,}  {b / GB:>8.2f}" for name, b in rows]
    budget = mem.gpu_memory_gb * GB
    verdict = "fits" if p.total <= budget else "does NOT fit"
    lines.append(
        f"{verdict} in {mem.gpu_memory_gb:g} GB: {p.total / GB:.2f} GB planned, "
        f"{(budget - p.total) / GB:+.2f} GB left (CUDA context, NCCL and fragmentation not counted)"
    )
    if p.total > budget:
        lines += [f"  {hint}" for hint in memory_hints(cfg, mem)]
    lines.append(f"per_rank_GB {p.total / GB:.2f}")
    return "\n".join(lines)


HINT_CHUNK_TOKENS = 1024


def memory_hints(cfg: ModelConfig, mem: MemoryConfig, prefix: str = "memory.") -> list[str]:
    """What the activation options this layout leaves off would plan, each added in turn (option
    names with `prefix`: the trainer's have none)."""
    hints: list[str] = []
    changes: dict[str, Any] = {}
    for field_name, value in (
        ("activation_checkpointing", True),
        ("loss_chunk_tokens", HINT_CHUNK_TOKENS),
    ):
        if getattr(mem, field_name) in (False, 0):
            changes[field_name] = value
            total = plan(cfg, dataclasses.replace(mem, **changes)).total
            options = " ".join(f"{prefix}{k}={str(v).lower()}" for k, v in changes.items())
            hints.append(f"with {options}: {total / GB:.2f} GB")
    return hints


def main() -> None:
    from cli import hydra_main

    hydra_main("finemoe-memory", CONFIG_DIR, "memory", "memory_schema", MemoryJob, _run)


def _run(job: MemoryJob) -> None:
    print(format_plan(job.model.validate(), job.memory))


if __name__ == "__main__":
    main()
