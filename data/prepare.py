"""`python -m data.prepare [data=<preset>] data.prepared_dir=<dir> [...]`: tokenise the sources once.

Writes the directory that training then reads with the same data config (`data.prepared_dir`):
memory-mapped token shards plus `index.json` (see `data.shards`).

Design choices:
- Worker processes each tokenise a range of rows, reading it themselves from the (memory-mapped)
  dataset; the parent only appends their token arrays, in order, to the shards. Workers run
  `tokenizers` single-threaded: the processes are the parallelism, Python's share of the work
  (Arrow to str, ids to numpy) included, which one process with Rust threads would serialise.
- Small inputs (the built-in corpus) are tokenised in this process: forking costs more than it saves.
- Output goes to a temporary sibling directory renamed into place at the end, so a crashed or
  interrupted run never leaves a directory that looks prepared.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.config import DataConfig
from data.encode import encode_documents, token_dtype
from data.shards import FORMAT, VERSION, ShardWriter, write_index
from data.sources import load_source
from data.tokenizer import fingerprint, load_tokenizer

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
# Forking and tearing down a pool from a process that has imported torch and datasets costs ~0.1 s;
# worker processes win it back from ~1 s of tokenising on (benchmarks/data.py: 2 processes beat one
# at 7 MB of text, lost at 0.5 MB), so below this much text one process (tokenizers' threads) is used.
_IN_PROCESS_MAX_BYTES = 4 << 20


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
        return self


@dataclass
class PrepareResult:
    """What `prepare` wrote."""

    path: Path
    num_docs: int
    num_tokens: int
    num_shards: int
    seconds: float


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Tokenise every source of `cfg.data` into `cfg.data.prepared_dir`.

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
    datasets_ = [load_source(src, i, data.cache_dir) for i, src in enumerate(data.sources)]
    fields = [src.text_field for src in data.sources]
    workers = cfg.num_workers or _auto_workers(datasets_)
    tasks = []
    for i, ds in enumerate(datasets_):
        # At least 4 tasks per worker process where rows allow, so small sources use every worker.
        size = (
            cfg.docs_per_task
            if workers == 1
            else max(1, min(cfg.docs_per_task, -(-len(ds) // (4 * workers))))
        )
        tasks += [(i, start, min(start + size, len(ds))) for start in range(0, len(ds), size)]
    workers = min(workers, len(tasks))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writers = [ShardWriter(tmp, i, dtype, cfg.shard_tokens) for i in range(len(datasets_))]
        bar = tqdm(total=len(tasks), unit="task", desc="tokenising", disable=None if cfg.progress else True)
        with (
            bar,
            _encoded(
                tokenizer.backend_tokenizer.to_str(), datasets_, fields, eos, dtype, tasks, workers
            ) as results,
        ):
            for i, tokens, lengths in results:
                writers[i].append(tokens, lengths)
                bar.update(1)
                bar.set_postfix(tokens=sum(w.num_tokens for w in writers), refresh=False)
        entries = []
        for i, (src, ds, writer) in enumerate(zip(data.sources, datasets_, writers)):
            entry = writer.close()
            if entry["num_docs"] == 0:
                raise ValueError(
                    f"data.sources[{i}] (path={src.path!r}): every {src.text_field!r} is empty or null"
                )
            entries.append({"source": src.identity(), "num_rows": len(ds), **entry})
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": np.dtype(dtype).newbyteorder("<").str,
            "eos_token_id": eos,
            "vocab_size": len(tokenizer),
            "tokenizer": {"name": data.tokenizer, "fingerprint": fingerprint(tokenizer)},
            "sources": entries,
        }
        write_index(tmp, index)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(
        path=out,
        num_docs=sum(e["num_docs"] for e in entries),
        num_tokens=sum(e["num_tokens"] for e in entries),
        num_shards=sum(len(e["shards"]) for e in entries),
        seconds=time.perf_counter() - t0,
    )


# ---- workers -------------------------------------------------------------------------------------
_worker: dict[str, Any] = {}  # per worker process, set by _init_worker (or in-process for 1 worker)


def _init_worker(
    tokenizer_json: str, datasets_: list[Any], fields: list[str], eos: int, dtype: np.dtype
) -> None:
    from tokenizers import Tokenizer

    _worker.update(
        tokenizer=Tokenizer.from_str(tokenizer_json), datasets=datasets_, fields=fields, eos=eos, dtype=dtype
    )


def _encode_task(task: tuple[int, int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    i, start, stop = task
    w = _worker
    texts = w["datasets"][i][start:stop][w["fields"][i]]
    tokens, lengths = encode_documents(
        w["tokenizer"], texts, w["eos"], w["dtype"], f"data.sources[{i}] rows {start}.."
    )
    return i, tokens, lengths


@contextmanager
def _encoded(
    tokenizer_json: str,
    datasets_: list[Any],
    fields: list[str],
    eos: int,
    dtype: np.dtype,
    tasks: list,
    workers: int,
) -> Iterator[Iterator[tuple[int, np.ndarray, np.ndarray]]]:
    """Task results in task order, from a pool of `workers` processes (or this one)."""
    args = (tokenizer_json, datasets_, fields, eos, dtype)
    if workers <= 1:
        _init_worker(*args)
        try:
            yield map(_encode_task, tasks)
        finally:
            _worker.clear()
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with _tokenizers_parallelism_off(), ctx.Pool(workers, initializer=_init_worker, initargs=args) as pool:
        yield pool.imap(_encode_task, tasks)


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
