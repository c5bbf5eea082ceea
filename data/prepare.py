"""`python -m data.prepare [data=<preset>] data.prepared_dir=<dir> [...]`: tokenise the sources once.

Writes the directory that training then reads with the same data config (`data.prepared_dir`):
token shards plus `index.json` (see `data.shards`), each source split into its train and its eval
documents (held out by a hash of their text, `data.encode.is_eval_document`).

Design choices:
- Worker processes each tokenise a range of rows, reading it themselves from the (memory-mapped)
  dataset; the parent only appends their token arrays, in order, to the shards. Workers run
  `tokenizers` single-threaded: the processes are the parallelism, Python's share of the work
  (Arrow to str, ids to numpy) included, which one process with Rust threads would serialise.
- Backpressure: at most `2 x num_workers` tasks are submitted and not yet written, so memory stays
  bounded when the output disk is slower than the workers.
- Small inputs (the built-in corpus) are tokenised in this process: forking costs more than it saves.
- Resumable: output goes to `.<name>.partial/` beside the target, with `progress.json`, which records
  every `progress_every_s` seconds how many tasks are written and each file's length (after an
  fsync). A rerun with the same sources, tokenizer and settings truncates the files to those lengths
  and continues with the next task, so its shards are byte-identical to an uninterrupted run's; any
  other partial directory is replaced. On success the directory is stamped (`verified.json`: every
  hash was computed from the bytes written) and renamed into place, so nothing that looks prepared is
  ever incomplete.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.config import DataConfig
from data.encode import encode_documents, split_documents, text_tokenizer, token_dtype
from data.shards import FORMAT, SPLITS, VERSION, ShardWriter, write_index, write_stamp
from data.sources import load_source
from data.tokenizer import fingerprint, load_tokenizer

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
# Forking and tearing down a pool from a process that has imported torch and datasets costs ~0.1 s;
# worker processes win it back from ~1 s of tokenising on (benchmarks/data.py: 2 processes beat one
# at 7 MB of text, lost at 0.5 MB), so below this much text one process (tokenizers' threads) is used.
_IN_PROCESS_MAX_BYTES = 4 << 20
PROGRESS = "progress.json"
EXIT_AFTER_TASKS = "FINEMOE_PREPARE_EXIT_AFTER_TASKS"
"""Tests: the process dies (exit 17, no clean-up) once this many tasks are written and recorded."""


@dataclass(kw_only=True)
class PrepareConfig:
    """The `data.prepare` job."""

    data: DataConfig = field(default_factory=DataConfig)
    """Sources and tokenizer to prepare; the output directory is `data.prepared_dir`."""
    num_workers: int = 0
    """Tokenising processes; 1 tokenises in this process (with `tokenizers`' threads); 0 picks: one per
    CPU, or 1 below 4 MB of text, where starting processes costs more than it saves."""
    docs_per_task: int = 256
    """Rows one worker tokenises per task, at most (fewer where a source has under 4 tasks per worker)."""
    shard_tokens: int = 1 << 28
    """Tokens per shard file, about (a shard is closed before the task that would overflow it)."""
    overwrite: bool = False
    """Replace an existing `data.prepared_dir`."""
    progress: bool = True
    """Show a progress bar (on a terminal)."""
    progress_every_s: float = 30.0
    """Seconds between progress records (files fsynced, `progress.json` written): at most this much
    work is redone after an interruption. 0 records after every task."""

    def validate(self) -> PrepareConfig:
        """Raise ValueError naming the first offending field. Returns self for chaining."""
        self.data.validate()
        if not self.data.prepared_dir:
            raise ValueError(
                "data.prepared_dir must name the output directory, e.g. data.prepared_dir=/scratch/prep"
            )
        for name in ("docs_per_task", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.progress_every_s < 0:
            raise ValueError(f"progress_every_s must be >= 0, got {self.progress_every_s}")
        return self


@dataclass
class PrepareResult:
    """What `prepare` wrote."""

    path: Path
    num_docs: int
    num_tokens: int
    num_shards: int
    seconds: float
    resumed_at_task: int = 0
    """Tasks an interrupted run had already written (0: a fresh start)."""


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Tokenise every source of `cfg.data` into `cfg.data.prepared_dir` (continuing an interrupted run).

    Raises:
        FileExistsError: the output exists and `overwrite` is false.
        FileNotFoundError, ValueError: as `data.sources.load_source` and `data.tokenizer.load_tokenizer`,
            and for a source whose texts are all empty.
    """
    t0 = time.perf_counter()
    cfg.validate()
    data = cfg.data
    out = Path(str(data.prepared_dir)).expanduser().absolute()
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"data.prepared_dir={str(out)!r} exists; set overwrite=true to replace it")
    tokenizer = load_tokenizer(data.tokenizer, data.cache_dir)
    eos, dtype = int(tokenizer.eos_token_id), token_dtype(len(tokenizer))
    # the Arrow conversion of a many-file source runs on up to num_workers processes (0: this one)
    datasets_ = [
        load_source(src, i, data.datasets_cache, num_proc=cfg.num_workers)
        for i, src in enumerate(data.sources)
    ]
    fields = [src.text_field for src in data.sources]
    workers = cfg.num_workers or _auto_workers(datasets_)
    job = {
        "format": VERSION,
        "sources": [src.identity() for src in data.sources],
        "num_rows": [len(ds) for ds in datasets_],
        "tokenizer": fingerprint(tokenizer),
        "dtype": np.dtype(dtype).newbyteorder("<").str,
        "shard_tokens": cfg.shard_tokens,
        "eval_fraction": data.eval_fraction,
    }
    partial = out.parent / f".{out.name}.partial"
    state = _progress(partial, job)
    if state is None:
        # At least 4 tasks per worker process where rows allow, so small sources use every worker.
        sizes = [
            cfg.docs_per_task
            if workers == 1
            else max(1, min(cfg.docs_per_task, -(-len(ds) // (4 * workers))))
            for ds in datasets_
        ]
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        state = {"job": job, "task_sizes": sizes, "next_task": 0, "writers": {}}
    else:
        print(f"data.prepare: resuming {partial} after task {state['next_task']}")
    rows = [len(ds) for ds in datasets_]
    num_tasks = sum(-(-n // size) for n, size in zip(rows, state["task_sizes"]))
    resumed_at = int(state["next_task"])
    workers = max(1, min(workers, num_tasks - resumed_at))
    writers = {
        (i, split): ShardWriter(
            partial, i, split, dtype, cfg.shard_tokens, state["writers"].get(f"{i}/{split}")
        )
        for i in range(len(datasets_))
        for split in SPLITS
    }
    _record(partial, state, resumed_at, writers)
    exit_after = int(os.environ.get(EXIT_AFTER_TASKS, "0"))
    bar = tqdm(
        total=num_tasks,
        initial=resumed_at,
        unit="task",
        desc="tokenising",
        disable=None if cfg.progress else True,
    )
    with (
        bar,
        _encoded(
            _Job(tokenizer.backend_tokenizer.to_str(), datasets_, fields, eos, dtype, data.eval_fraction),
            _tasks(rows, state["task_sizes"], resumed_at),
            workers,
        ) as results,
    ):
        recorded = time.monotonic()
        for done, (i, parts) in enumerate(results, start=resumed_at + 1):
            for split, (tokens, lengths) in parts.items():
                writers[(i, split)].append(tokens, lengths)
            bar.update(1)
            bar.set_postfix(tokens=sum(w.num_tokens for w in writers.values()), refresh=False)
            if time.monotonic() - recorded >= cfg.progress_every_s or done == exit_after:
                _record(partial, state, done, writers)
                recorded = time.monotonic()
            if done == exit_after:
                os._exit(17)
    entries: list[dict[str, Any]] = []
    for i, (src, ds) in enumerate(zip(data.sources, datasets_)):
        splits = {split: writers[(i, split)].close() for split in SPLITS}
        if not any(s["num_docs"] for s in splits.values()):
            shutil.rmtree(partial, ignore_errors=True)
            raise ValueError(
                f"data.sources[{i}] (path={src.path!r}): every {src.text_field!r} is empty or null"
            )
        entries.append({"source": src.identity(), "num_rows": len(ds), "splits": splits})
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": job["dtype"],
        "eos_token_id": eos,
        "vocab_size": len(tokenizer),
        "tokenizer": {"name": data.tokenizer, "fingerprint": job["tokenizer"]},
        "special_tokens": "text",  # special-token text in documents is encoded as text
        "eval_fraction": data.eval_fraction,
        "eval_split": "blake2b-64 of each document's text, keyed (data.encode.is_eval_document)",
        "sources": entries,
    }
    write_index(partial, index)
    (partial / PROGRESS).unlink()
    write_stamp(partial)  # the hashes were computed from the bytes written
    _publish(partial, out)
    return PrepareResult(
        path=out,
        num_docs=sum(s["num_docs"] for e in entries for s in e["splits"].values()),
        num_tokens=sum(s["num_tokens"] for e in entries for s in e["splits"].values()),
        num_shards=sum(len(s["shards"]) for e in entries for s in e["splits"].values()),
        seconds=time.perf_counter() - t0,
        resumed_at_task=resumed_at,
    )


def _progress(partial: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded progress of an interrupted run of this same job, or None."""
    try:
        state = json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if state.get("job") != job:
        print(
            f"data.prepare: {partial} belongs to another job (sources, tokenizer or settings); starting over"
        )
        return None
    return state


def _record(partial: Path, state: dict[str, Any], next_task: int, writers: dict[Any, ShardWriter]) -> None:
    """fsync every open file, then atomically write `progress.json`: `next_task` tasks are written."""
    state["next_task"] = next_task
    state["writers"] = {f"{i}/{split}": w.state() for (i, split), w in writers.items()}
    tmp = partial / f"{PROGRESS}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(state))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, partial / PROGRESS)


def _tasks(rows: list[int], sizes: list[int], first: int) -> Iterator[tuple[int, int, int]]:
    """Tasks `(source, start row, stop row)` in order, from task number `first` on: generated, not
    listed (5 billion documents in tasks of 256 are 20 million tuples, ~3 GB as a list)."""
    for i, (n, size) in enumerate(zip(rows, sizes)):
        count = -(-n // size)
        if first >= count:
            first -= count
            continue
        for start in range(first * size, n, size):
            yield i, start, min(start + size, n)
        first = 0


# ---- workers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What every encoding worker needs (handed to each worker process once, at its start)."""

    tokenizer_json: str
    datasets: list[Any]
    fields: list[str]
    """Per source: the text field."""
    eos: int
    dtype: np.dtype
    eval_fraction: float


_worker: dict[str, Any] = {}  # per worker process, set by _init_worker (or in-process for 1 worker)


def _init_worker(job: _Job) -> None:
    from tokenizers import Tokenizer

    _worker.update(job=job, tokenizer=text_tokenizer(Tokenizer.from_str(job.tokenizer_json)))


def _encode_task(task: tuple[int, int, int]) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    i, start, stop = task
    job: _Job = _worker["job"]
    texts = job.datasets[i][start:stop][job.fields[i]]
    where = f"data.sources[{i}] rows {start}.."
    parts = split_documents(texts, job.eval_fraction)
    return i, {
        split: encode_documents(_worker["tokenizer"], parts[split], job.eos, job.dtype, where)
        for split in SPLITS
    }


def bounded_imap(pool: Any, fn: Any, items: Iterable[Any], window: int) -> Iterator[Any]:
    """`pool.imap(fn, items)` with at most `window` results submitted and not yet consumed: a slow
    consumer (the disk) holds the producers back instead of letting results pile up in memory."""
    it = iter(items)
    pending = collections.deque(pool.apply_async(fn, (x,)) for x in itertools.islice(it, window))
    while pending:
        result = pending.popleft().get()
        for x in itertools.islice(it, 1):
            pending.append(pool.apply_async(fn, (x,)))
        yield result


@contextmanager
def _encoded(
    job: _Job, tasks: Iterable[tuple[int, int, int]], workers: int
) -> Iterator[Iterator[tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]]]:
    """Task results in task order, from a pool of `workers` processes (or this one)."""
    if workers <= 1:
        _init_worker(job)
        try:
            yield map(_encode_task, tasks)
        finally:
            _worker.clear()
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with _tokenizers_parallelism_off(), ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        yield bounded_imap(pool, _encode_task, tasks, 2 * workers)


@contextmanager
def _tokenizers_parallelism_off() -> Iterator[None]:
    """Children start single-threaded (and `tokenizers` stays quiet about forking after threads ran)."""
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _auto_workers(datasets_: list[Any]) -> int:
    """One process per CPU, or this process alone for text too small to repay starting processes."""
    if sum(ds.data.nbytes for ds in datasets_) < _IN_PROCESS_MAX_BYTES:
        return 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished directory into place, replacing an old one only once the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def main() -> None:
    from cli import hydra_main  # stdlib only: data still imports nothing of moe/, upcycle/, train/

    hydra_main("finemoe-prepare", CONFIG_DIR, "data_prepare", "data_prepare_schema", PrepareConfig, _run)


def _run(job: PrepareConfig) -> None:
    r = prepare(job)
    print(
        f"prepared {r.path}: {r.num_docs:,} documents, {r.num_tokens:,} tokens in {r.num_shards} shards, "
        f"{r.seconds:.1f} s ({r.num_tokens / r.seconds:,.0f} tokens/s)"
    )


if __name__ == "__main__":
    main()
