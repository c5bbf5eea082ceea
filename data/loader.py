"""The loader: micro-batches of packed samples for one data-parallel rank, endless and exactly resumable.

Design choices:
- Ranks deal the global sample sequence round-robin: micro-batch k of rank r holds global samples
  next + (k*B + i)*W + r for i < B (B micro-batch size, W ranks). One micro-batch on every rank
  consumes the next B*W samples, so the state is one number, the next global sample, identical on all
  ranks and valid for any W and B: a resumed run, with as many ranks or not, continues at exactly
  the next sample.
- Epochs are not boundaries of iteration: the sequence is endless and each epoch is reshuffled
  (`data.stream`); `state_dict()` reports the epoch for logging.
- A background thread assembles `prefetch_batches` micro-batches ahead (numpy copies release the GIL),
  so the trainer does not wait; the state counts only micro-batches handed out. It is a daemon (a
  crashed trainer must not hang on it), so every live one is stopped at interpreter exit: a daemon
  thread still inside torch when the interpreter finalizes aborts the process ("terminate called
  without an active exception", exit 134) after a run that had finished.
- Mixture phases: with `DataConfig.new_mixture_on_resume`, a resume with other weights starts the new
  mixture at sample 0, each source offset past the samples of the windows it had entered
  (`source_offsets` in the state, `Mixture.reserved`): nothing is served twice.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import weakref
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from data.config import DataConfig, Split
from data.dataset import PackedDataset, Untaken, build_dataset
from data.mixture import Mixture

STATE_VERSION = 1
_MIXTURE = {"weights", "mixture_window"}  # what `new_mixture_on_resume` may change


def build_loader(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerFast,
    split: Split | str = Split.train,
    dp_rank: int = 0,
    dp_world: int = 1,
    micro_batch_size: int = 1,
    untaken: Untaken | None = None,
) -> PackedLoader:
    """Build the loader of one data-parallel rank.

    Args:
        cfg: the data config.
        tokenizer: from `data.tokenizer.load_tokenizer(cfg.tokenizer, cfg.cache_dir)`.
        split: "train" or "eval" (the held-out `eval_fraction` of every source).
        dp_rank: this rank's index among the data-parallel ranks.
        dp_world: number of data-parallel ranks.
        micro_batch_size: samples per yielded batch on this rank.
        untaken: shared by the train and eval loaders of a run, so that each source is tokenised
            once (`data.dataset.build_dataset`).

    Raises:
        ValueError: bad rank arguments, and everything `data.dataset.build_dataset` raises.
    """
    if dp_world < 1 or not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    dataset = build_dataset(cfg, tokenizer, split, untaken, hash_share=(dp_rank, dp_world))
    return PackedLoader(
        dataset,
        dp_rank=dp_rank,
        dp_world=dp_world,
        micro_batch_size=micro_batch_size,
        eos_token_id=int(tokenizer.eos_token_id),
        reset_attention=cfg.reset_attention_at_doc_boundary,
        prefetch_batches=cfg.prefetch_batches,
        new_mixture_on_resume=cfg.new_mixture_on_resume,
    )


class _Assembler:
    """Builds the micro-batch that starts a round at a given global sample (no loader state)."""

    def __init__(self, dataset: PackedDataset, rank: int, world: int, batch: int, eos: int, reset: bool):
        self.dataset = dataset
        self.offsets = np.arange(batch, dtype=np.int64) * world + rank
        self.eos = eos
        self.reset = reset

    def __call__(self, round_start: int) -> dict[str, torch.Tensor]:
        g = round_start + self.offsets
        blocks = np.empty((len(g), self.dataset.block_len), dtype=np.int64)
        self.dataset.read(g, blocks)
        inputs = np.ascontiguousarray(blocks[:, :-1])
        batch = {
            "input_ids": torch.from_numpy(inputs),
            "targets": torch.from_numpy(np.ascontiguousarray(blocks[:, 1:])),
        }
        if self.reset:
            position_ids, document_ids = document_positions(inputs, self.eos)
            batch["position_ids"] = torch.from_numpy(position_ids)
            batch["document_ids"] = torch.from_numpy(document_ids)
        return batch


def document_positions(input_ids: np.ndarray, eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and document ids that restart at every document start.

    A document starts at column 0 and right after every EOS; its EOS belongs to it.

    Args:
        input_ids: int [B, S].
        eos_token_id: the separator.

    Returns:
        `position_ids` [B, S] (0 at each document start) and `document_ids` [B, S] (0, 1, ... per row).
    """
    starts = np.zeros(input_ids.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    document_ids = np.cumsum(starts, axis=1, dtype=np.int64) - 1
    column = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape)
    position_ids = column - np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    return position_ids, document_ids


class PackedLoader:
    """Endless iterator of one rank's micro-batches, with `state_dict()` / `load_state_dict()`.

    Each batch is a dict of int64 tensors: `input_ids` and `targets` [B, seq_len] (a block of
    seq_len + 1 tokens, shifted by one), plus `position_ids` and `document_ids` [B, seq_len] when
    the config resets attention at document boundaries.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        dp_rank: int,
        dp_world: int,
        micro_batch_size: int,
        eos_token_id: int,
        reset_attention: bool,
        prefetch_batches: int,
        new_mixture_on_resume: bool = False,
    ):
        self.dataset = dataset
        self.new_mixture_on_resume = new_mixture_on_resume
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.micro_batch_size = micro_batch_size
        self.prefetch_batches = prefetch_batches
        self._assemble = _Assembler(
            dataset, dp_rank, dp_world, micro_batch_size, eos_token_id, reset_attention
        )
        self._next_sample = 0
        self._prefetcher: _Prefetcher | None = None

    @property
    def samples_per_step(self) -> int:
        """Global samples one micro-batch on every rank consumes."""
        return self.micro_batch_size * self.dp_world

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch_batches == 0:
            batch = self._assemble(self._next_sample)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(
                    self._assemble, self._next_sample, self.samples_per_step, self.prefetch_batches
                )
            try:
                batch = self._prefetcher.get()
            except BaseException:
                self.close()  # the producer has exited; a retry starts a new one
                raise
        self._next_sample += self.samples_per_step
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the next micro-batch starts, as a global sample index (the same on every rank), and
        the samples each source had served before the current mixture phase."""
        return {
            "version": STATE_VERSION,
            "next_sample": self._next_sample,
            "source_offsets": [int(x) for x in self.dataset.source_offsets],
            "epoch": self.dataset.epoch(self._next_sample),
            "source_epochs": self.dataset.source_epochs(self._next_sample),
            "identity": self.dataset.identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; the rank count and micro-batch size may differ.

        With `new_mixture_on_resume`, changed weights or mixture window start a new mixture phase:
        the position restarts at 0 and each source continues at the samples it had served.

        Raises:
            ValueError: a state of another version, or of a different sample sequence (names what changed).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved, current = state["identity"], self.dataset.identity
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        offsets = np.asarray(state.get("source_offsets") or [0] * len(self.dataset.streams), dtype=np.int64)
        next_sample = int(state["next_sample"])
        if changed and set(changed) <= _MIXTURE and self.new_mixture_on_resume:
            old = Mixture(saved["weights"], saved["mixture_window"], self.dataset.mixture.key)
            offsets, next_sample = offsets + old.reserved(next_sample), 0
        elif changed:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in changed)
            hint = (
                "; set data.new_mixture_on_resume=true to start a new mixture phase"
                if set(changed) <= _MIXTURE
                else ""
            )
            raise ValueError(f"the loader state belongs to a different sample sequence ({detail}){hint}")
        self.close()
        self.dataset.source_offsets = offsets
        self._next_sample = next_sample

    def close(self) -> None:
        """Stop the prefetch thread (iteration may continue; it restarts on demand)."""
        prefetcher = getattr(self, "_prefetcher", None)  # absent if __init__ failed
        if prefetcher is not None:
            prefetcher.stop()
            self._prefetcher = None

    def __del__(self) -> None:
        self.close()


class _Prefetcher:
    """A daemon thread that assembles successive micro-batches into a bounded queue."""

    live: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()
    """Started and not stopped; `_stop_live_prefetchers` stops them at interpreter exit."""

    def __init__(self, assemble: _Assembler, start: int, step: int, depth: int):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            args=(assemble, start, step, self._queue, self._stop),
            daemon=True,
            name="data-prefetch",
        )
        self._thread.start()
        _Prefetcher.live.add(self)

    def get(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()
        _Prefetcher.live.discard(self)
        if threading.current_thread() is self._thread:
            return  # the loader was collected on this thread (gc runs anywhere): it ends after this item
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.01)
        self._thread.join()


@atexit.register
def _stop_live_prefetchers() -> None:
    """Runs before finalization (atexit handlers do), while the threads can still finish their step."""
    for prefetcher in list(_Prefetcher.live):
        prefetcher.stop()


def _produce(
    assemble: _Assembler, start: int, step: int, out: queue.Queue[Any], stop: threading.Event
) -> None:
    round_start = start
    while not stop.is_set():
        try:
            item: Any = assemble(round_start)
        except Exception as e:  # handed to the consumer, raised there
            item = e
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item, Exception):
            return
        round_start += step


def config_sequence_changes(state: dict[str, Any], cfg: DataConfig) -> list[str]:
    """What the data config alone says differs from a saved train-loader `state`: the keys of the
    sample sequence that need no data read (`seq_len`, `seed`, `eval_fraction`), as `data.key: saved
    x, now y`. A trainer checks them before it builds anything; `load_state_dict` checks everything."""
    saved = state.get("identity", {})
    current = {"seq_len": cfg.seq_len, "seed": cfg.seed, "eval_fraction": cfg.eval_fraction}
    return [
        f"data.{k}: saved {saved[k]!r}, now {v!r}" for k, v in current.items() if k in saved and saved[k] != v
    ]
