"""Benchmark: `data.prepare` against plain `tokenizers` batched encoding, and the loader on prepared shards.

    python benchmarks/data.py [--copies 1 16] [--workers 0 2] [--runs 7] [--seq-len 4096] [--batch 8]
    python benchmarks/data.py --interrupted-gb 2 [--workers 2]     # 3. only

3. Interrupted preparation (`--interrupted-gb`): a generated jsonl corpus of that size (the built-in
   documents, each with a unique first line) is prepared by `python -m data.prepare`-equivalent
   subprocess, SIGKILLed once `progress.json` records half of the tasks, then run again to the end.
   Reported: each run's seconds, the tasks redone, tokens/s over both runs, and the peak memory of
   the writing process and of all processes (sampled every 0.2 s).

1. Tokenisation. The built-in corpus (optionally `--copies` times over, as that many sources, to
   measure on more than ~130k tokens) is tokenised two ways in alternating runs: plain
   `Tokenizer.encode_batch` over all documents (Rust threads on every core), and `data.prepare`
   end to end (load the tokenizer and sources, worker processes, shards, hashes, index; Python
   start-up and Hydra excluded), once per `--workers` setting: 0 is the default (this process
   below 4 MB of text, else one process per CPU), 2 forces two worker processes. Both rates count
   the same document tokens. Target (issue 5): the pipeline runs at >= 0.8x the plain encoding.
2. Loading. A loader reads the prepared built-in corpus (`seq_len` 4096, micro-batch 8) for about
   two seconds per variant: on demand, with document positions, and with the prefetch thread
   (measured on the consumer side). Target: >= 2M tokens/s, 50x what one H100 consumes training
   the A2.7B shape (~40k tokens/s).

Runs alternate and the best of `--runs` is reported with the median beside it: the machine may be
shared, and the best run is the one least disturbed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.config import DataConfig, SourceConfig  # noqa: E402
from data.corpus import builtin_documents  # noqa: E402
from data.loader import build_loader  # noqa: E402
from data.prepare import PrepareConfig, prepare  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402

H100_A2_7B_TOKENS_PER_S = 40_000
LOADER_TARGET = 50 * H100_A2_7B_TOKENS_PER_S


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_tokenise(
    tokenizer, work: Path, cache: str, copies: int, runs: int, workers: list[int]
) -> list[dict]:
    docs = list(builtin_documents()) * copies
    backend = tokenizer.backend_tokenizer
    num_tokens = sum(len(e) for e in backend.encode_batch(docs, add_special_tokens=False))  # also warms up
    plain: list[float] = []
    pipeline: dict[int, list[float]] = {w: [] for w in workers}
    for run in range(runs):
        for w in workers:
            t0 = time.perf_counter()
            backend.encode_batch(docs, add_special_tokens=False)
            plain.append(time.perf_counter() - t0)
            out = work / f"prep-{copies}-{w}-{run}"
            cfg = DataConfig(sources=[SourceConfig()] * copies, cache_dir=cache, prepared_dir=str(out))
            result = prepare(PrepareConfig(data=cfg, num_workers=w, progress=False))
            pipeline[w].append(result.seconds)
            assert result.num_tokens == num_tokens + result.num_docs  # + one EOS per document
    return [
        {"copies": copies, "workers": w, "tokens": num_tokens, "plain": plain, "pipeline": pipeline[w]}
        for w in workers
    ]


def bench_loader(tokenizer, prepared: str, cache: str, seq_len: int, batch: int, seconds: float) -> list:
    rows = []
    variants = [
        ("on demand", dict(prefetch_batches=0)),
        ("on demand, document positions", dict(prefetch_batches=0, reset_attention_at_doc_boundary=True)),
        ("prefetch thread (2 batches)", dict(prefetch_batches=2)),
    ]
    for name, overrides in variants:
        cfg = DataConfig(seq_len=seq_len, cache_dir=cache, prepared_dir=prepared, **overrides)
        loader = build_loader(cfg, tokenizer, micro_batch_size=batch)
        next(loader)
        steps, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            next(loader)
            steps += 1
        loader.close()
        rows.append((name, steps * batch * seq_len / elapsed, loader.state_dict()["epoch"]))
    return rows


PREPARE_DRIVER = """
import sys
from data.config import DataConfig, SourceConfig
from data.prepare import PrepareConfig, prepare
corpus, out, cache, workers = sys.argv[1:5]
cfg = DataConfig(sources=[SourceConfig(path=corpus)], cache_dir=cache, prepared_dir=out, eval_fraction=0.001)
r = prepare(PrepareConfig(data=cfg, num_workers=int(workers), progress=False, progress_every_s=10))
print(r.num_tokens, r.num_docs, r.num_shards, r.resumed_at_task, flush=True)
"""


def _watch(proc, sample: dict) -> None:
    """Peak RSS of `proc` and of it with its children, sampled until it exits."""
    import psutil

    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            own = p.memory_info().rss
            total = own + sum(c.memory_info().rss for c in p.children(recursive=True))
        except psutil.Error:
            break
        sample["own"], sample["total"] = max(sample.get("own", 0), own), max(sample.get("total", 0), total)
        time.sleep(0.2)


def bench_interrupted(gb: float, workers: int) -> None:
    import json
    import random
    import signal
    import subprocess
    import threading

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work, cache = Path(tmp), str(Path(tmp) / "cache")
        corpus = work / "corpus.jsonl"
        docs, rng = list(builtin_documents()), random.Random(0)
        t0, n = time.perf_counter(), 0
        with open(corpus, "w") as f:
            while f.tell() < gb * 1e9:
                f.write(json.dumps({"text": f"document {n}\n" + rng.choice(docs)}) + "\n")
                n += 1
        size, t_gen = corpus.stat().st_size, time.perf_counter() - t0
        out, partial = work / "prepared", work / ".prepared.partial"
        cmd = [sys.executable, "-c", PREPARE_DRIVER, str(corpus), str(out), cache, str(workers)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        runs = []
        for attempt in ("killed", "resumed"):
            sample: dict = {}
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            watcher = threading.Thread(target=_watch, args=(proc, sample), daemon=True)
            watcher.start()
            done_at_kill = None
            while attempt == "killed" and proc.poll() is None:
                try:
                    state = json.loads((partial / "progress.json").read_text())
                    rows, sizes = state["job"]["num_rows"], state["task_sizes"]
                    total = sum(-(-r // s) for r, s in zip(rows, sizes))
                    if state["next_task"] >= total // 2:
                        done_at_kill = (state["next_task"], total)
                        proc.send_signal(signal.SIGKILL)
                        break
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.5)
            stdout, stderr = proc.communicate()
            watcher.join()
            runs.append((attempt, time.perf_counter() - t0, proc.returncode, stdout, sample, done_at_kill))
            if attempt == "resumed" and proc.returncode != 0:
                raise SystemExit(stderr[-3000:])
        tokens, num_docs, shards, resumed_at = (int(x) for x in runs[1][3].splitlines()[-1].split())
        recorded, total = runs[0][5] or (0, 0)
        seconds = runs[0][1] + runs[1][1]
        print(f"device: {cpu_name()}, {os.cpu_count()} CPUs; date {datetime.date.today().isoformat()}")
        print(f"command: python benchmarks/data.py --interrupted-gb {gb} --workers {workers}")
        print(f"corpus: {size / 1e9:.2f} GB jsonl, {n:,} documents (generated in {t_gen:.0f} s)")
        print()
        print("| run | seconds | tasks | peak RSS writer (GB) | peak RSS all processes (GB) |")
        print("|---|---:|---|---:|---:|")
        print(
            f"| killed (SIGKILL) | {runs[0][1]:.0f} | {recorded} of {total} recorded when killed | "
            f"{runs[0][4].get('own', 0) / 1e9:.2f} | {runs[0][4].get('total', 0) / 1e9:.2f} |"
        )
        print(
            f"| resumed | {runs[1][1]:.0f} | resumed after task {resumed_at}, {total - resumed_at} run | "
            f"{runs[1][4].get('own', 0) / 1e9:.2f} | {runs[1][4].get('total', 0) / 1e9:.2f} |"
        )
        print()
        print(
            f"{tokens:,} tokens, {num_docs:,} documents, {shards} shards; {seconds:.0f} s in all, "
            f"{tokens / seconds:,.0f} tokens/s; leftovers beside the output: "
            f"{sorted(p.name for p in work.iterdir() if p.name not in ('corpus.jsonl', 'cache', 'prepared'))}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 16], help="built-in corpus copies")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.prepare num_workers")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="per loader variant")
    parser.add_argument("--interrupted-gb", type=float, default=0, help="3. only: corpus size in GB")
    args = parser.parse_args()
    if args.interrupted_gb:
        bench_interrupted(args.interrupted_gb, args.workers[-1] or os.cpu_count() or 1)
        return

    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp), str(Path(tmp) / "cache")
        tokenizer = load_tokenizer("builtin", cache)
        results = [
            r for c in args.copies for r in bench_tokenise(tokenizer, work, cache, c, args.runs, args.workers)
        ]
        prepared = str(
            prepare(PrepareConfig(data=DataConfig(cache_dir=cache, prepared_dir=str(work / "p")))).path
        )
        loader_rows = bench_loader(tokenizer, prepared, cache, args.seq_len, args.batch, args.seconds)

    print(f"device: {cpu_name()}, {os.cpu_count()} CPUs; Python {platform.python_version()}")
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"command: python benchmarks/data.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(
        "| built-in corpus | num_workers | tokens | plain encode_batch tokens/s | data.prepare tokens/s "
        "| ratio (target >= 0.8) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        best_plain, best_pipe = r["tokens"] / min(r["plain"]), r["tokens"] / min(r["pipeline"])
        med_plain, med_pipe = (
            r["tokens"] / statistics.median(r["plain"]),
            r["tokens"] / statistics.median(r["pipeline"]),
        )
        print(
            f"| x{r['copies']}, best of {len(r['pipeline'])} (median) | {r['workers']} | {r['tokens']:,} "
            f"| {best_plain:,.0f} ({med_plain:,.0f}) "
            f"| {best_pipe:,.0f} ({med_pipe:,.0f}) | {best_pipe / best_plain:.2f} ({med_pipe / med_plain:.2f}) |"
        )
    print()
    print(
        f"| loader on prepared shards (seq_len {args.seq_len}, micro-batch {args.batch}) | tokens/s | x target (2M) |"
    )
    print("|---|---:|---:|")
    for name, rate, epoch in loader_rows:
        print(f"| {name} ({epoch} epochs read) | {rate:,.0f} | {rate / LOADER_TARGET:.1f} |")


if __name__ == "__main__":
    main()
