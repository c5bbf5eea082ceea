"""The training loop. It owns the step; logging, images and wandb are callbacks.

One optimizer step = `grad_accum` micro-batches per rank, each: forward, objective, `engine.backward`,
`engine.step` (DeepSpeed applies the optimizer at the accumulation boundary). Everything a resumed run
needs (weights, Adam moments, LR position, data position, routers' biases, RNG) is in the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data.config import Split
from data.dataset import Untaken
from data.loader import build_loader, config_sequence_changes
from data.tokenizer import check_vocab, load_tokenizer
from moe.config import ModelConfig
from moe.hf import from_pretrained
from moe.model import Qwen2MoEForCausalLM
from moe.router import TopKRouter
from train import checkpoint, preemption, resume_check
from train import engine as ds
from train.callbacks.base import Callback
from train.callbacks.heatmap import write_heatmap
from train.callbacks.jsonl import JsonlMetrics
from train.comm import Comm
from train.config import TrainConfig, WandbMode, launcher_world_size
from train.metrics import expert_load, flops_per_token, load_fractions, peak_tflops
from train.objective import Objective, update_selection_bias
from train.schedule import lr_lambda

FAULT_KILL = "FINEMOE_FAULT_KILL"
"""`RANK:STEP`: that rank SIGKILLs itself as the step starts (tests of a rank lost mid-run)."""
FAULT_NONFINITE = "FINEMOE_FAULT_NONFINITE"
"""`STEP`: that step's loss is NaN on every rank (tests of skipped updates)."""
FAULT_TERM = "FINEMOE_FAULT_SIGTERM_AT_BUILD"
"""`RANK`: that rank sends itself SIGTERM while the run is being built (tests of an early preemption)."""


class NonFiniteLossError(RuntimeError):
    pass


def build_model(cfg: TrainConfig, device: torch.device) -> Qwen2MoEForCausalLM:
    """From scratch (seeded, identical on every rank) or from a Hugging Face directory."""
    if cfg.init_from is not None:
        model = from_pretrained(
            cfg.init_from,
            dtype=torch.float32,
            device=device,
            expert_backend=cfg.model.expert_backend,
            router_aux_loss_coef=cfg.model.router_aux_loss_coef,
            router_z_loss_coef=cfg.model.router_z_loss_coef,
        )
        assert isinstance(model, Qwen2MoEForCausalLM)
        return model
    with torch.device("meta"):
        model = Qwen2MoEForCausalLM(cfg.model)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(torch.Generator(device=device).manual_seed(cfg.seed))
    return model


class Trainer:
    def __init__(self, cfg: TrainConfig, callbacks: list[Callback] | None = None):
        # Everything that can be checked is, before the process group, the model or the data exist,
        # and nothing is written before all of it is built.
        ds.finished_cleanly = False  # a sweep's earlier job may have set it
        world = launcher_world_size()
        self.cfg = cfg.validate(world)
        self.run_dir = Path(cfg.run_dir)
        self.resolved_config = OmegaConf.to_container(
            OmegaConf.structured(cfg), resolve=True, enum_to_str=True
        )
        expected = cfg.model_config()
        found = checkpoint.candidates(cfg.checkpoint.resume, self.run_dir)  # quiet: restore() reports
        if found:  # another architecture is refused now, by name
            self._resume_changes(found[0], asdict(expected), world)
        if int(os.environ.get("RANK", "0")) == 0:
            cuda = cfg.uses_cuda() and torch.cuda.is_available()  # validate() refused device=cuda without
            gpu_memory = torch.cuda.get_device_properties(0).total_memory if cuda else None
            for warning in cfg.warnings(expected, world, gpu_memory):
                print(f"warning: {warning}", file=sys.stderr)
        self.comm = Comm.init(cfg.device, timeout_s=cfg.dist_timeout_s)
        self.device, self.rank, self.world = self.comm.device, self.comm.rank, self.comm.world
        if self.world != world:
            cfg.validate(self.world)
        torch.manual_seed(cfg.seed)
        if os.environ.get(FAULT_TERM) == str(self.rank):
            os.kill(os.getpid(), signal.SIGTERM)

        self.tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.cache_dir)
        self.model = build_model(cfg, self.device)
        self.mcfg: ModelConfig = self.model.config
        check_vocab(self.tokenizer, self.mcfg.vocab_size)
        bf16 = cfg.uses_bf16()
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.model.loss_chunk_tokens = cfg.loss_chunk_tokens
        self.ep_group_name = ds.shard_experts(self.model, cfg.parallel.ep_size)
        self.engine = ds.build_engine(
            self.model,
            ep_group_name=self.ep_group_name,
            ep_size=cfg.parallel.ep_size,
            num_experts=self.mcfg.num_experts,
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
            lr_lambda=lr_lambda(cfg.schedule, cfg.max_steps),
            zero_stage=cfg.deepspeed.zero_stage,
            bf16=bf16,
            grad_accum_dtype=cfg.deepspeed.grad_accum_dtype.value,
            micro_batch_size=cfg.deepspeed.micro_batch_size,
            grad_accum=cfg.deepspeed.grad_accum,
            grad_clip=cfg.optim.grad_clip,
            reduce_bucket_size=cfg.deepspeed.reduce_bucket_size,
            overlap_comm=cfg.deepspeed.overlap_comm,
        )
        self.objective = Objective(
            cfg.moe.balance_scope,
            self.mcfg.router_aux_loss_coef,
            self.mcfg.router_z_loss_coef,
            self.comm,
            ds.dp_group(),
        )
        self.routers = [m for m in self.model.modules() if isinstance(m, TopKRouter)]
        untaken: Untaken = {}  # a source tokenised for training keeps its held-out split for eval
        self.loader = build_loader(
            cfg.data,
            self.tokenizer,
            split=Split.train,
            dp_rank=self.rank,
            dp_world=self.world,
            micro_batch_size=cfg.deepspeed.micro_batch_size,
            untaken=untaken,
        )
        self.eval_loader = None
        if cfg.eval_every:  # built once; every evaluation rewinds it to the same first batch
            self.eval_loader = build_loader(
                cfg.data,
                self.tokenizer,
                split=Split.eval,
                dp_rank=self.rank,
                dp_world=self.world,
                micro_batch_size=cfg.deepspeed.micro_batch_size,
                untaken=untaken,
            )
            self._eval_start = self.eval_loader.state_dict()
        self.callbacks: list[Callback] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))  # exports ship it
            self.callbacks = [JsonlMetrics()]
            if cfg.logging.wandb is not WandbMode.disabled:
                from train.callbacks.wandb_logger import WandbLogger

                self.callbacks.append(
                    WandbLogger(cfg.logging.wandb.value, cfg.logging.project, cfg.logging.name)
                )
            self.callbacks += callbacks or []
        self.step = 0
        self.tokens_seen = 0
        self.checkpoint_parent: str | None = None
        """Id of the checkpoint this run continues (resumed or last saved): the next save's parent."""
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0

    # ---- lifecycle -----------------------------------------------------------------------------
    def resume_if_requested(self) -> None:
        # the newest undamaged checkpoint (older ones of the branch when files are missing or corrupt)
        restored = checkpoint.restore(
            self.engine, self.model, self.cfg.checkpoint.resume, self.run_dir, self.comm
        )
        self.checkpoint_parent = None if restored is None else restored.id  # the next save continues it
        if restored is None:
            return
        ckpt, meta = restored.path, restored.meta
        changed = self._resume_changes(ckpt, asdict(self.mcfg), self.world)
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.loader.load_state_dict(meta["loader"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        # a skipped update does not advance the schedule (`ds.skip_optimizer_step`, DeepSpeed's own skips)
        ds.set_schedule_position(self.engine, int(meta.get("lr_steps", self.step - self.skipped_steps)))
        if self.rank == 0:
            print(f"resumed from {ckpt} at step {self.step}")
            if changed:
                print(f"changed on resume: {resume_check.describe(changed)}")
        for cb in self.callbacks:
            cb.on_resume(self.step, changed)

    def _resume_changes(
        self, ckpt: Path, model: dict[str, Any], world: int
    ) -> dict[str, resume_check.Change]:
        """What this run changes against the checkpoint's recorded config; ValueError for another model."""
        meta = json.loads((ckpt / checkpoint.META).read_text())
        sequence = config_sequence_changes(meta.get("loader", {}), self.cfg.data)
        if sequence:
            raise ValueError(
                f"cannot resume from {ckpt}: the data sample sequence differs ({'; '.join(sequence)}). A "
                "resumed run continues its sequence; for a phase with another seq_len, export the checkpoint "
                "(python -m train.export) and train from it with init_from= in a new run_dir"
            )
        try:
            return resume_check.changes(meta, self.resolved_config, model, world)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"cannot resume from {ckpt}: {e}") from None

    def save(self) -> Path:
        meta = {
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "skipped_steps": self.skipped_steps,
            "lr_steps": self.engine.lr_scheduler.last_epoch,
            "model_config": asdict(self.mcfg),
            "ep_size": self.cfg.parallel.ep_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "config": self.resolved_config,
        }
        saved = checkpoint.save(
            self.engine,
            self.model,
            self.comm,
            self.run_dir,
            self.step,
            meta,
            self.ep_group_name,
            self.cfg.checkpoint.keep_last,
            parent=self.checkpoint_parent,
        )
        self.checkpoint_parent = saved.id
        return saved.path

    def _leave_other_branches(self) -> None:
        """A rollback or a fresh start moves the other branches aside now, as the logs do (`on_start`),
        once the resume was accepted; rank 0 moves, and a failure stops every rank."""
        error = None
        if self.rank == 0:
            try:
                root = checkpoint.checkpoint_root(self.run_dir)
                checkpoint.move_aside_other_branches(root, "restart", self.checkpoint_parent)
            except OSError as e:
                error = e
        if self.comm.any(error is not None):
            raise OSError(f"could not move the other checkpoint branches aside: {error or 'see rank 0'}")

    def _stop_signal(self) -> int | None:
        """The stop signal some rank received (`train.preemption`), the same on every rank (one
        all-reduce, every rank reaches it), or None."""
        return int(self.comm.max(float(preemption.received() or 0)).item()) or None

    def fit(self) -> list[dict[str, float]]:
        """Train to `max_steps` (or a stop signal). Returns the logged metrics of this process' steps.

        A stop signal (SIGTERM, SIGINT) ends the run after the step in progress, which is saved; one
        received while the run was built or restored ends it before its first step (nothing to save).
        """
        previous = preemption.listen(signal.SIGTERM, signal.SIGINT)
        try:
            return self._fit()
        finally:
            preemption.restore(previous)
            preemption.forget_interrupt()

    def _fit(self) -> list[dict[str, float]]:
        cfg = self.cfg
        ds.finished_cleanly = False
        signum = self._stop_signal()  # a SIGTERM while building: do not spend the grace on a restore
        if signum is None:
            self.resume_if_requested()
            signum = self._stop_signal()
        if signum is not None:
            if self.rank == 0:
                print(f"stopped by signal {signum} before training; nothing new to save")
            return self._finish([], None, started=False)
        self._leave_other_branches()
        resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        for cb in self.callbacks:
            cb.on_start(self.run_dir, resolved, self.step)  # type: ignore[arg-type]
        history: list[dict[str, float]] = []
        if cfg.eval_at_start and self.step == 0:  # validate(): eval_at_start needs eval_every
            metrics = {"train/tokens_seen": 0.0, **self.evaluate()}
            history.append(metrics)
            for cb in self.callbacks:
                cb.on_metrics(0, metrics)
        data_iter = iter(self.loader)
        progress = self._progress()
        while self.step < cfg.max_steps:
            if os.environ.get(FAULT_KILL) == f"{self.rank}:{self.step + 1}":  # crash tests: a rank dies
                os.kill(os.getpid(), signal.SIGKILL)
            metrics, load_LE = self.train_step(data_iter)
            self.step += 1
            if self.rank == 0 and progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}"
                )
            evaluated = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
            if evaluated:
                metrics |= self.evaluate()
            if evaluated or self.step % cfg.logging.log_every == 0 or self.step == cfg.max_steps:
                history.append(metrics)
                for cb in self.callbacks:
                    cb.on_metrics(self.step, metrics)
            if load_LE is not None and (
                self.step % cfg.logging.heatmap_every == 0 or self.step == cfg.max_steps
            ):
                self._heatmap(load_LE)
            signum = self._stop_signal()
            stop = signum is not None or self.step == cfg.stop_at_step
            periodic = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
            if periodic or stop or (self.step == cfg.max_steps and cfg.checkpoint.save_at_end):
                self.save()
            if stop:
                if self.rank == 0:
                    why = f"signal {signum}" if signum is not None else "stop_at_step"
                    print(f"stopped by {why} at step {self.step}; checkpoint saved")
                break
        return self._finish(history, progress)

    def _finish(
        self, history: list[dict[str, float]], progress: Any, started: bool = True
    ) -> list[dict[str, float]]:
        if progress is not None:
            progress.close()
        for cb in self.callbacks if started else []:  # on_end pairs with on_start
            cb.on_end()
        self.loader.close()  # its prefetch thread would otherwise assemble batches nobody takes
        ds.finished_cleanly = True
        return history

    def _progress(self):
        if self.rank != 0 or not self.cfg.logging.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", dynamic_ncols=True)

    # ---- one optimizer step --------------------------------------------------------------------
    def _batch(self, data_iter) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in next(data_iter).items()}

    def train_step(self, data_iter) -> tuple[dict[str, float], torch.Tensor | None]:
        cfg, engine = self.cfg, self.engine
        t0 = time.perf_counter()
        self.engine.train()
        batches = (self._batch(data_iter) for _ in range(cfg.deepspeed.grad_accum))
        lr = float(engine.get_lr()[0])  # this step's (the update advances the schedule)
        poison = os.environ.get(FAULT_NONFINITE) == str(self.step + 1)
        result = optimizer_step(
            engine,
            self.objective,
            self.comm,
            batches,
            cfg.deepspeed.grad_accum,
            on_forward=_nan_loss if poison else None,
        )
        load_LE = result.load_LE
        if load_LE is not None:
            load_LE = self.comm.sum(load_LE)  # each rank counted its own tokens (by global expert id)
            if cfg.moe.bias_update_rate > 0 and not result.nonfinite:
                update_selection_bias(self.routers, list(load_LE), cfg.moe.bias_update_rate)
        # the step's one read of the device: losses over ranks, and the token count
        totals = self.comm.sum(torch.cat([result.sums, result.tokens[None]])).tolist()
        loss, ce, aux, z = (t / self.world for t in totals[:4])
        tokens_all = int(totals[4])
        self._track_nonfinite(result.nonfinite)
        self.tokens_seen += tokens_all
        dt = time.perf_counter() - t0
        metrics: dict[str, float] = {
            "train/loss": loss,
            "train/ce_loss": ce,
            "train/lr": lr,
            "train/grad_norm": ds.grad_norm(engine),
            "train/tokens_seen": float(self.tokens_seen),
            "train/skipped_steps": float(self.skipped_steps),
            "perf/step_time_s": dt,
            "perf/tokens_per_s": tokens_all / dt,
        }
        peak = cfg.logging.peak_tflops or peak_tflops(self.device)
        if peak:
            achieved = flops_per_token(self.mcfg, cfg.data.seq_len) * tokens_all / dt / self.world
            metrics["perf/mfu"] = achieved / (peak * 1e12)
        if load_LE is not None:
            metrics["train/aux_loss"], metrics["train/z_loss"] = aux, z
            for k, value in expert_load(load_LE, self.mcfg.moe_layers).items():
                metrics[f"moe/{k}"] = value
        return metrics, load_LE

    def _track_nonfinite(self, nonfinite: bool) -> None:
        if not nonfinite:
            self.nonfinite_in_a_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.rank == 0:
            print(
                f"step {self.step + 1}: non-finite loss or gradients, update skipped ({self.nonfinite_in_a_row} in a row)"
            )
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradients (max_nonfinite_in_a_row="
                f"{self.cfg.max_nonfinite_in_a_row}); stopping. Lower optim.lr or check the data."
            )

    def _heatmap(self, load_LE: torch.Tensor) -> None:
        if self.rank != 0:
            return
        frac = load_fractions(load_LE).cpu()
        png = write_heatmap(
            frac, self.run_dir / "expert_load" / f"step_{self.step:08d}.png", f"expert load, step {self.step}"
        )
        for cb in self.callbacks:
            cb.on_expert_load(self.step, frac, png)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean cross-entropy and perplexity on the held-out split (same batches every time)."""
        assert self.eval_loader is not None, "evaluate() needs eval_every > 0"
        self.eval_loader.load_state_dict(self._eval_start)
        self.engine.eval()
        ce_sum = torch.zeros((), device=self.device)  # accumulated on the device, read once
        tokens = 0
        for _ in range(self.cfg.eval_batches):
            batch = self._batch(self.eval_loader)
            out = self.engine(**batch)
            ce_sum += out.ce_loss.float() * batch["input_ids"].numel()
            tokens += batch["input_ids"].numel()
        self.eval_loader.close()  # no prefetch thread idles until the next evaluation
        total = self.comm.sum(torch.stack([ce_sum, ce_sum.new_tensor(float(tokens))]))
        self.engine.train()
        loss = (total[0] / total[1]).item()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


@dataclass
class StepResult:
    """One optimizer step on this rank. Tensors are on the device; nothing was read from it but the
    one flag that decides whether the update is applied."""

    sums: torch.Tensor
    """[loss, ce, aux, z], each the mean over this rank's micro-batches (aux, z: 0 for dense models)."""
    tokens: torch.Tensor
    """This rank's token count (fp32 scalar, to travel with `sums` in one collective)."""
    load_LE: torch.Tensor | None
    """This rank's expert-assignment counts summed over micro-batches [MoE layers, experts]."""
    nonfinite: bool
    """Some rank had a non-finite loss or gradient: the update was skipped everywhere."""


def optimizer_step(
    engine: Any,
    objective: Objective,
    comm: Comm,
    batches: Iterable[dict[str, torch.Tensor]],
    grad_accum: int,
    *,
    before_update: Callable[[Any], None] | None = None,
    on_forward: Callable[[Any], None] | None = None,
) -> StepResult:
    """`grad_accum` micro-batches of forward, objective, backward; then the update.

    No host synchronisation per micro-batch: losses, counts and the non-finite flag accumulate on the
    device. At the boundary one collective decides, identically on every rank, whether to apply the
    update. A non-finite loss is still back-propagated (its NaN gradients are discarded with the
    skipped update), so every rank runs the same collectives, in DeepSpeed and in the expert all-to-all.
    `before_update(engine)` sees the reduced gradients before clipping and the update (tests);
    `on_forward(output)` sees each micro-batch's model output.
    """
    objective.start_step()
    sums = torch.zeros(4, device=comm.device)
    bad = torch.zeros((), device=comm.device)
    load_LE: torch.Tensor | None = None
    tokens = 0
    nonfinite = False
    for batch in batches:
        out = engine(**batch)
        if on_forward is not None:
            on_forward(out)
        terms = objective(out)
        bad = torch.maximum(bad, (~torch.isfinite(terms.loss.detach())).float())
        engine.backward(terms.loss)
        if engine.is_gradient_accumulation_boundary():
            if before_update is not None:
                before_update(engine)
            ds.clip_gradients(engine, comm)
            nonfinite = comm.any(bad) or ds.nonfinite_grads_without_zero(engine)
            with ds.skip_optimizer_step(engine, skip=nonfinite):
                engine.step()
            nonfinite = nonfinite or not ds.step_was_applied(engine)
        else:
            engine.step()
        zero = sums.new_zeros(())
        parts = [
            terms.loss,
            terms.ce,
            zero if terms.aux is None else terms.aux,
            zero if terms.z is None else terms.z,
        ]
        sums += torch.stack([t.detach().float() for t in parts]) / grad_accum
        tokens += batch["input_ids"].numel()
        if out.balance:
            counts = torch.stack([b.counts_E for b in out.balance]).detach()
            load_LE = counts if load_LE is None else load_LE + counts
    return StepResult(sums, sums.new_tensor(float(tokens)), load_LE, nonfinite)


def _nan_loss(out: Any) -> None:
    out.ce_loss = out.ce_loss * float("nan")


def run(cfg: TrainConfig, callbacks: list[Callback] | None = None) -> list[dict[str, Any]]:
    """Build a trainer and train; returns rank-local logged metrics."""
    return Trainer(cfg, callbacks).fit()
