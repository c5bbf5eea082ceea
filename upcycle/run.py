"""Run an upcycling: stream the dense checkpoint in, the Qwen2-MoE checkpoint out.

Design choices:
- One layer at a time is read (a fresh `CheckpointReader` per layer, so the memory-mapped pages of
  the previous layer are released), its experts are built one at a time, and each tensor goes
  straight to its planned place on disk (`PlannedShardWriter`). Peak memory is one layer's dense FFN
  plus a few expert tensors, whatever the number of experts or the shard size.
- Building (torch ops) runs in background threads, a few tensors ahead of writing (file writes):
  both release the GIL, so compute and I/O overlap, and the experts of a layer are built on a pool
  of single-threaded workers (one per CPU, at most 4).
- The output is written under a temporary name and renamed when complete, so an interrupted run
  never leaves a directory that looks like a checkpoint.
- Attention, norms, embeddings, LM head and the layers that stay dense are copied unchanged (bit for
  bit when the output dtype is the source's).
- The init distance (upcycle/distance.py) reads the same stream in a thread of its own, a bounded
  number of tensors behind the writer, and lands in the report before the output is published.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moe.config import ModelConfig
from moe.hf import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    TOKENIZER_FILES,
    CheckpointReader,
    expected_hf_shapes,
)
from upcycle.build import DenseFFN, moe_layer_tensors, needs_stats, work_dtype
from upcycle.calibration import calibration_ids
from upcycle.config import MoEShape, SplitMethod, Strategy, UpcycleConfig
from upcycle.distance import InitDistance, summary_line
from upcycle.plan import UpcyclePlan, make_plan
from upcycle.strategies import get_strategy
from upcycle.writer import PlannedShardWriter

REPORT_NAME = "upcycle_report.json"
REPORT_VERSION = 2  # 2: init_distance, the written context length; reinit_fraction may be null
PREFETCH_TENSORS = 16  # expert tensors built ahead of the writer (about 6 MB each at A2.7B)
DISTANCE_LAG_TENSORS = 8  # tensors the init-distance thread may lag behind the writer


def source_fingerprint(source: str | Path) -> str:
    """sha256 over config.json and the weight files (name and content hash of each, sorted by name)."""
    source = Path(source)
    reader = CheckpointReader(source)
    files = [source / "config.json", *sorted(set(reader.key_to_file.values()))]
    total = hashlib.sha256()
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        total.update(path.name.encode() + b"\0" + h.digest())
    return "sha256:" + total.hexdigest()


def _layer_copy_keys(dense: ModelConfig) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """Source keys copied unchanged: before the layers, per layer (attention + norms), after."""
    head, tail = [], []
    per_layer: dict[int, list[str]] = {i: [] for i in range(dense.num_hidden_layers)}
    for key in expected_hf_shapes(dense):
        if key.startswith("model.layers."):
            i = int(key.split(".")[2])
            if ".mlp." not in key:
                per_layer[i].append(key)
        elif key == "model.embed_tokens.weight":
            head.append(key)
        else:
            tail.append(key)
    return head, per_layer, tail


def output_tensors(
    plan: UpcyclePlan, pool: Executor | None = None, num_workers: int = 1
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (HF key, tensor) of the upcycled checkpoint, in order, one at a time.

    With `pool` (of `num_workers` threads), each layer's experts are built in parallel.
    """
    dense, moe, cfg, dtype = plan.dense, plan.moe, plan.cfg, plan.dtype
    strategy = get_strategy(cfg.strategy)
    head, per_layer, tail = _layer_copy_keys(dense)
    reader = CheckpointReader(plan.source)
    for key in head:
        yield key, reader.get(key).to(dtype)
    layers = tqdm(
        range(dense.num_hidden_layers), desc="upcycle", unit="layer", disable=not cfg.progress, leave=False
    )
    for i in layers:
        reader = CheckpointReader(plan.source)  # drops the previous layer's mapped pages
        for key in per_layer[i]:
            yield key, reader.get(key).to(dtype)
        if not moe.is_moe_layer(i):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{i}.mlp.{proj}.weight"
                yield key, reader.get(key).to(dtype)
            continue
        up_FH = None
        if cfg.strategy is Strategy.split and cfg.split_method is SplitMethod.clustering:
            up_FH = reader.get(f"model.layers.{i}.mlp.up_proj.weight")
        layer_plan = strategy.plan_layer(i, moe, dense, cfg, up_FH=up_FH)
        ffn = DenseFFN.read(
            reader,
            i,
            dense.hidden_size,
            dense.intermediate_size,
            work_dtype(layer_plan, dtype),
            with_stats=needs_stats(layer_plan),
            pool=pool,
        )
        yield from moe_layer_tensors(layer_plan, ffn, moe, i, cfg, dtype, pool, num_workers)
        del ffn
    reader = CheckpointReader(plan.source)
    for key in tail:
        yield key, reader.get(key).to(dtype)


def prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items`, produced by a background thread up to `depth` ahead of the consumer.

    Building experts (torch ops) and writing them (file writes) both release the GIL, so the two
    overlap; an exception on either side stops both and is raised in the caller.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(("error", e))

    thread = threading.Thread(target=produce, name="upcycle-producer", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


class BackgroundConsumer:
    """Calls `fn(*item)` for each `put` item in a thread of its own, at most `depth` items behind.

    An exception in `fn` stops the consumer and is raised by the next `put` or by `close`.
    """

    def __init__(self, fn: Callable[..., None], depth: int):
        self._q: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._fn = fn
        self._thread = threading.Thread(target=self._run, name="upcycle-distance", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            if self._error is None and not self._stop.is_set():
                try:
                    self._fn(*item)
                except BaseException as e:  # handed to the caller
                    self._error = e

    def __enter__(self) -> BackgroundConsumer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On an exception elsewhere: drop the queued items and end the thread."""
        if exc_type is not None and self._thread.is_alive():
            self._stop.set()
            self._q.put(None)
            self._thread.join()

    def put(self, *item: Any) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(item)

    def close(self) -> None:
        """Wait for the queued items; raise the consumer's exception, if any."""
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def upcycle(
    source: str | Path,
    output: str | Path,
    moe: MoEShape | Mapping[str, Any] | None = None,
    cfg: UpcycleConfig | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Upcycle the dense Qwen2 checkpoint `source` into a Qwen2-MoE checkpoint at `output`.

    Args:
        source: Hugging Face directory of a dense Qwen2 model (config.json + safetensors).
        output: directory to create (must be absent or empty unless `cfg.overwrite`).
        moe: the MoE shape (a `MoEShape` or a dict of its fields); default Qwen1.5-MoE-A2.7B's.
        cfg: the recipe; default `UpcycleConfig()` (finegrained, seed 0).
        verbose: print the plan before writing and a summary after.

    Returns:
        The report (also written to `<output>/upcycle_report.json` unless `cfg.dry_run`).

    Raises:
        ValueError: for bad input, before anything is written (see `make_plan`).
    """
    start = time.perf_counter()
    cfg = cfg or UpcycleConfig()
    plan = make_plan(source, output, moe if moe is not None else MoEShape(), cfg)
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "strategy": plan.cfg.strategy.value,
        "seed": plan.cfg.seed,
        "upcycle": _jsonable(dataclasses.asdict(plan.cfg)),
        "moe": dataclasses.asdict(plan.shape),
        "source": str(plan.source.resolve()),
        "output": str(plan.output.resolve()),
        "plan": plan.to_dict(),
        "dry_run": plan.cfg.dry_run,
    }
    if verbose:
        print(plan.format(), flush=True)
    else:  # the plan's warnings are in its printout; without one they still reach the user
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    if plan.cfg.dry_run:
        report["init_distance"] = {"skipped": "dry run"}
        return report
    calibration = plan.cfg.calibration
    distance: InitDistance | None = None
    if calibration.num_sequences > 0:  # before anything is written: a bad path is an input error
        ids_BL, calibration_info = calibration_ids(plan.source, calibration, plan.moe.vocab_size)
        distance = InitDistance(plan, ids_BL)
    else:
        report["init_distance"] = {"skipped": "upcycle.calibration.num_sequences=0"}
    # The work is memory-bound copies and sequential RNG streams (one per expert): experts are built
    # on a pool of single-threaded workers instead of with intra-op threads, which would only spin
    # against the writer thread and the kernel's writeback.
    num_threads, num_workers = torch.get_num_threads(), build_workers()
    torch.set_num_threads(1)
    try:
        with (
            ThreadPoolExecutor(num_workers, thread_name_prefix="upcycle-build") as pool,
            PlannedShardWriter(
                plan.output, plan.shapes, plan.dtype, plan.cfg.max_shard_bytes, overwrite=plan.cfg.overwrite
            ) as writer,
        ):
            fingerprint = pool.submit(source_fingerprint, plan.source)
            with BackgroundConsumer(distance.add if distance else _ignore, DISTANCE_LAG_TENSORS) as measure:
                for key, tensor in prefetched(output_tensors(plan, pool, num_workers), PREFETCH_TENSORS):
                    writer.add(key, tensor)
                    if distance is not None:
                        measure.put(key, tensor)
                    del tensor
                measure.close()
            _write_metadata(writer, plan)
            if distance is not None:
                torch.set_num_threads(num_threads)  # the LM-head products: nothing else runs now
                report["init_distance"] = {"calibration": calibration_info} | distance.result()
            report["source_fingerprint"] = fingerprint.result()
            report["bytes_written"] = writer.total_bytes
            report["time_s"] = round(time.perf_counter() - start, 3)
            report["versions"] = _versions()
            writer.write_json(REPORT_NAME, report)
    finally:
        torch.set_num_threads(num_threads)
    if verbose:
        print(
            f"wrote {plan.output} ({writer.total_bytes / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s"
        )
        print(summary_line(report["init_distance"]))
    return report


def _ignore(*_: Any) -> None:
    pass


def build_workers() -> int:
    """Threads building experts: the CPUs this process may use, at most 4."""
    return max(
        1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def _write_metadata(writer: PlannedShardWriter, plan: UpcyclePlan) -> None:
    """config.json for the MoE model; generation config and tokenizer files copied from the source."""
    writer.write_json(CONFIG_NAME, plan.config_json())
    if (plan.source / GENERATION_CONFIG_NAME).is_file():
        writer.copy_file(plan.source / GENERATION_CONFIG_NAME)
    else:
        ids = {
            k: getattr(plan.moe, k)
            for k in ("bos_token_id", "eos_token_id")
            if getattr(plan.moe, k) is not None
        }
        writer.write_json(GENERATION_CONFIG_NAME, ids)
    for name in TOKENIZER_FILES:
        if (plan.source / name).is_file():
            writer.copy_file(plan.source / name)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in d.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("finemoe", "torch", "safetensors", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
