"""Data at cluster scale, at CI size: hashes checked once, bounded open files, a resumable and bounded
`data.prepare`, special-token text kept as text, and a mixture that may change on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest

from data.config import SourceConfig
from data.dataset import build_dataset
from data.loader import build_loader
from data.prepare import PrepareConfig, prepare
from data.shards import open_prepared
from tests.data.helpers import blocks_of, data_config, make_docs, take, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def bytes_read() -> int:
    """Bytes this process has read through read()/pread() so far (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, cache_dir):
    """220 documents, one task and one shard each: ~200 train and ~20 eval shards."""
    root = tmp_path_factory.mktemp("many")
    corpus = write_jsonl(root / "c.jsonl", make_docs(220, seed=7))
    cfg = data_config(cache_dir, [corpus], eval_fraction=0.1, prepared_dir=str(root / "prepared"))
    prepare(PrepareConfig(data=cfg, num_workers=1, docs_per_task=1, shard_tokens=1, progress=False))
    return cfg


def test_open_files_stay_bounded_with_200_shards(many_shards, tokenizer):
    """Train and eval loaders (with prefetch threads) read every shard; the process never holds more
    than `max_open_shards` of them open (before: one descriptor per shard and loader)."""
    assert len(list(Path(many_shards.prepared_dir).rglob("tokens_*.bin"))) >= 200
    cfg = replace(many_shards, prefetch_batches=2, seq_len=64)
    before = open_fds()
    train = build_loader(cfg, tokenizer, "train", micro_batch_size=8)
    held_out = build_loader(cfg, tokenizer, "eval", micro_batch_size=8)
    peak = 0
    for _ in range(40):  # 320 samples of 65 tokens: every train shard, several times
        next(train)
        next(held_out)
        peak = max(peak, open_fds() - before)
    assert peak <= 64 + 2, peak  # the default bound (+ slack for a thread's transient descriptor)
    train.close()
    held_out.close()


def test_a_small_bound_is_kept_and_shared_by_both_loaders(many_shards, tokenizer):
    cfg = replace(many_shards, prefetch_batches=0, seq_len=64, max_open_shards=8)
    train = build_loader(cfg, tokenizer, "train", micro_batch_size=8)
    held_out = build_loader(cfg, tokenizer, "eval", micro_batch_size=8)
    shared = train.dataset.streams[0].store._prepared
    assert held_out.dataset.streams[0].store._prepared is shared
    for _ in range(20):
        next(train)
        next(held_out)
        assert shared.handles.num_open <= 8


def test_the_tighter_bound_wins_when_a_directory_is_opened_again(many_shards):
    """Both loaders share one handle cache per directory; the second open's bound is not ignored."""
    first = open_prepared(Path(many_shards.prepared_dir), 64)
    again = open_prepared(Path(many_shards.prepared_dir), 8)
    assert again is first and first.handles.max_open == 8
    assert open_prepared(Path(many_shards.prepared_dir), 64).handles.max_open == 8


def test_train_start_checks_sizes_only(tmp_path, cache_dir, tokenizer):
    """`data.prepare` stamps its output: building the train and eval loaders then reads almost nothing
    (before: every shard hashed by each loader, on every rank, at every start). A copy (new mtimes)
    is hashed once, by the first reader, and stamped again."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(3000, seed=3))
    cfg = data_config(cache_dir, [corpus], eval_fraction=0.1, prepared_dir=str(tmp_path / "p"))
    prepare(PrepareConfig(data=cfg, num_workers=1, shard_tokens=20_000, progress=False))
    corpus_bytes = sum(f.stat().st_size for f in (tmp_path / "p").rglob("*.bin"))
    assert corpus_bytes > 200_000

    def build_both(c) -> int:
        start = bytes_read()
        build_loader(c, tokenizer, "train")
        build_loader(c, tokenizer, "eval")
        return bytes_read() - start

    assert build_both(cfg) < corpus_bytes / 10
    subprocess.run(["cp", "-r", str(tmp_path / "p"), str(tmp_path / "copy")], check=True)
    copy = replace(cfg, prepared_dir=str(tmp_path / "copy"))
    assert build_both(copy) >= corpus_bytes  # no valid stamp: hashed once
    del copy
    copy = replace(cfg, prepared_dir=str(tmp_path / "copy"))
    assert build_both(copy) < corpus_bytes / 10  # stamped by that first check


def test_ranks_hash_their_share_and_a_read_only_directory_is_stamped_in_the_cache(
    tmp_path, cache_dir, tokenizer, monkeypatch
):
    """A copy (new mtimes: no valid stamp) on a read-only file system without flock (a shared dataset
    mount). Each of 2 ranks hashes about half (at the same time: no rank waits in a collective for
    another's hashing) and stamps nothing; one process hashes it all and stamps under
    `<cache_dir>/verified/`, so the next start reads almost nothing. Before, every rank hashed the
    whole corpus at every start (the stamp could not be written), and a file system without flock
    stopped training."""
    import errno
    import fcntl

    from data import shards

    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(3000, seed=3))
    cfg = data_config(cache_dir, [corpus], eval_fraction=0.1, prepared_dir=str(tmp_path / "p"))
    prepare(PrepareConfig(data=cfg, num_workers=1, shard_tokens=20_000, progress=False))
    subprocess.run(["cp", "-r", str(tmp_path / "p"), str(tmp_path / "ro")], check=True)
    ro = tmp_path / "ro"
    corpus_bytes = sum(f.stat().st_size for f in ro.rglob("*.bin"))
    real_replace = os.replace

    def read_only_replace(src, dst):
        if Path(dst).parent == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst)

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(shards.os, "replace", read_only_replace)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    copy = replace(cfg, prepared_dir=str(ro), cache_dir=str(tmp_path / "cache"))

    def build(rank: int, world: int) -> int:
        """Bytes read to build a rank's train and eval loaders, alive together as in the trainer."""
        start = bytes_read()
        train = build_loader(copy, tokenizer, "train", dp_rank=rank, dp_world=world)
        build_loader(copy, tokenizer, "eval", dp_rank=rank, dp_world=world)
        del train
        return bytes_read() - start

    shares = [build(0, 2), build(1, 2)]
    assert all(0.2 * corpus_bytes < b < 0.8 * corpus_bytes for b in shares), (shares, corpus_bytes)
    assert sum(shares) < 1.2 * corpus_bytes  # together: about once
    assert not (tmp_path / "cache" / "verified").exists()  # no rank knows the others' results
    assert build(0, 1) >= corpus_bytes  # one process: all of it, then the stamp
    assert (ro / shards.STAMP).read_text() == (tmp_path / "p" / shards.STAMP).read_text()  # the stale copy
    assert len(list((tmp_path / "cache" / "verified").iterdir())) == 1
    assert build(1, 2) < corpus_bytes / 10  # the next start: the stamp in the cache is valid
    (ro / "source_000" / "train" / "tokens_00000.bin").touch()  # rewritten, as far as a stat can tell
    assert build(0, 1) >= corpus_bytes


DRIVER = """
import sys
from data.config import DataConfig, SourceConfig
from data.prepare import PrepareConfig, prepare
from data.shards import open_prepared
corpus, out, cache = sys.argv[1:4]
cfg = DataConfig(sources=[SourceConfig(path=corpus)], cache_dir=cache, prepared_dir=out, eval_fraction=0.1)
prepare(PrepareConfig(data=cfg, num_workers=2, docs_per_task=16, shard_tokens=3000, progress=False,
                      progress_every_s=0))
"""


def test_prepare_killed_midway_resumes_to_byte_identical_shards(tmp_path, cache_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(600, seed=11))
    env = dict(os.environ, FINEMOE_PREPARE_EXIT_AFTER_TASKS="13", PYTHONPATH=str(REPO))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", DRIVER, str(corpus), str(killed), cache_dir]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 17, res.stderr[-3000:]  # died after 13 of ~38 tasks, nothing cleaned up
    partial = tmp_path / ".killed.partial"
    assert not killed.exists() and (partial / "progress.json").is_file()

    cfg = data_config(cache_dir, [corpus], eval_fraction=0.1, prepared_dir=str(killed))
    job = dict(num_workers=2, docs_per_task=16, shard_tokens=3000, progress=False, progress_every_s=0)
    resumed = prepare(PrepareConfig(data=cfg, **job))
    assert resumed.resumed_at_task == 13
    straight = prepare(PrepareConfig(data=replace(cfg, prepared_dir=str(tmp_path / "straight")), **job))
    assert resumed.num_shards == straight.num_shards > 4
    files = sorted(
        p.relative_to(killed) for p in killed.rglob("*") if p.is_file() and p.name != "verified.json"
    )
    assert files == sorted(
        p.relative_to(straight.path)
        for p in straight.path.rglob("*")
        if p.is_file() and p.name != "verified.json"
    )
    for rel in files:
        assert (killed / rel).read_bytes() == (straight.path / rel).read_bytes(), rel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "killed", "straight"]  # no leftovers


def test_prepare_holds_producers_back_when_the_disk_is_slow():
    """At most `window` results are submitted and not yet written (before: `imap` let every result
    pile up in memory while the consumer was slow)."""
    from data.prepare import bounded_imap

    started, lock = [0], threading.Lock()

    def work(x: int) -> int:
        with lock:
            started[0] += 1
        return x

    worst = 0
    with ThreadPool(4) as pool:
        for consumed, x in enumerate(bounded_imap(pool, work, range(100), window=6), start=1):
            time.sleep(0.002)  # the slow disk
            with lock:
                worst = max(worst, started[0] - consumed)
            assert x == consumed - 1  # in order
    assert worst <= 6


SPECIAL = ["quoting a template: <|im_start|>user hi<|im_end|> then <|endoftext|> and more", "plain text"]


@pytest.mark.parametrize("prepared", [False, True])
def test_special_token_text_in_documents_stays_text(tmp_path, cache_dir, tokenizer, prepared):
    corpus = write_jsonl(tmp_path / "c.jsonl", SPECIAL)
    cfg = data_config(cache_dir, [corpus], seq_len=8)
    if prepared:
        cfg.prepared_dir = str(tmp_path / "p")
        prepare(PrepareConfig(data=cfg, num_workers=1, progress=False))
    store = build_dataset(cfg, tokenizer, "train").streams[0].store
    tokens = store.read(0, store.num_tokens)
    ends = np.flatnonzero(tokens == tokenizer.eos_token_id)
    assert len(ends) == 2 and ends[1] == len(tokens) - 1  # EOS only after each document
    first = tokens[: ends[0]]
    assert tokenizer.decode(first) == SPECIAL[0]


def test_mixture_weights_change_on_resume_with_the_option(tmp_path, cache_dir, tokenizer):
    """Weights 1:1, then 3:1 for an annealing phase: each source continues where it stopped (no
    sample served twice, none skipped), and the position survives a further save and restore."""
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(60, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(60, seed=2))
    cfg = data_config(cache_dir, [a, b], mixture_window=8, seq_len=16)
    first = build_loader(cfg, tokenizer, micro_batch_size=4)
    before = take(first, 10)
    state = first.state_dict()

    annealed = replace(cfg, sources=[replace(cfg.sources[0], weight=3.0), cfg.sources[1]])
    with pytest.raises(
        ValueError, match=r"weights: saved \[1\.0, 1\.0\], now \[3\.0, 1\.0\].*new_mixture_on_resume=true"
    ):
        build_loader(annealed, tokenizer, micro_batch_size=4).load_state_dict(state)
    annealed.new_mixture_on_resume = True
    second = build_loader(annealed, tokenizer, micro_batch_size=4)
    second.load_state_dict(state)
    after = take(second, 10)

    served: dict[int, list[int]] = {0: [], 1: []}
    old_src, old_local = first.dataset.mixture.locate(np.arange(40))
    new_src, new_local = second.dataset.mixture.locate(np.arange(40))
    for src, local, offsets in (
        (old_src, old_local, [0, 0]),
        (new_src, new_local, second.dataset.source_offsets),
    ):
        for s, p in zip(src, local):
            served[int(s)].append(int(p) + int(offsets[s]))
    for s, samples in served.items():
        assert sorted(samples) == list(range(len(samples))), s  # contiguous, no repeats
    assert len(served[0]) == 20 + 30 and len(served[1]) == 20 + 10  # 1:1, then 3:1
    # the batches are those samples' blocks
    ds = second.dataset
    expected = np.empty((40, cfg.block_len), dtype=np.int64)
    for g, (s, p) in enumerate(zip(new_src, new_local)):
        stream = ds.streams[s]
        stream.read_block(int(stream.block_of(np.array([p + ds.source_offsets[s]]))[0]), expected[g])
    assert np.array_equal(np.concatenate([blocks_of(x) for x in after]), expected)
    assert not np.array_equal(blocks_of(before[0]), blocks_of(after[0]))
    # a plain resume within the new phase continues it
    third = build_loader(annealed, tokenizer, micro_batch_size=4)
    third.load_state_dict(second.state_dict())
    assert third.dataset.source_offsets.tolist() == second.dataset.source_offsets.tolist()
    assert np.array_equal(blocks_of(next(third)), blocks_of(next(second)))


def test_a_mixture_change_mid_window_serves_nothing_twice(tmp_path, cache_dir, tokenizer):
    """The change falls mid-window (36 samples, window 8). Within a window a source's samples come in
    a permuted order, so continuing at the count served repeated some and skipped as many (the review
    found 174 of 512 repeated); the new phase now starts past the window entered."""
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(60, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(60, seed=2))
    cfg = data_config(cache_dir, [a, b], mixture_window=8, seq_len=16)
    first = build_loader(cfg, tokenizer, micro_batch_size=4)
    take(first, 9)
    annealed = replace(cfg, sources=[replace(cfg.sources[0], weight=3.0), cfg.sources[1]])
    annealed.new_mixture_on_resume = True
    second = build_loader(annealed, tokenizer, micro_batch_size=4)
    second.load_state_dict(first.state_dict())
    old_src, old_local = first.dataset.mixture.locate(np.arange(36))
    new_src, new_local = second.dataset.mixture.locate(np.arange(40))
    new_local = new_local + second.dataset.source_offsets[new_src]
    for s in (0, 1):
        before, after = set(old_local[old_src == s].tolist()), set(new_local[new_src == s].tolist())
        assert 16 <= len(before) <= 20 and not before & after, s  # 4 windows of 4, part of the 5th
        assert after == set(range(20, 20 + len(after)))  # past window 4 (its share: 4), no more skipped
    assert any(len(set(old_local[old_src == s].tolist())) not in (16, 20) for s in (0, 1))  # mid-window


def test_datasets_cache_can_live_away_from_home(tmp_path, cache_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(20))
    scratch = tmp_path / "scratch"
    cfg = data_config(cache_dir, [corpus], datasets_cache_dir=str(scratch), prepared_dir=str(tmp_path / "p"))
    prepare(PrepareConfig(data=cfg, num_workers=1, progress=False))
    assert list(scratch.rglob("*.arrow"))  # the Arrow copy of the jsonl went to scratch
    assert (
        SourceConfig(path=str(corpus)).identity()
        == json.loads((tmp_path / "p" / "index.json").read_text())["sources"][0]["source"]
    )
