"""Data-parallel ranks read disjoint samples that cover the sequence; save/restore resumes at the next sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.config import SourceConfig
from data.loader import build_loader
from tests.data.helpers import blocks_of, data_config, make_docs, reference_stream, take, write_jsonl

DOCS = make_docs(80, max_words=40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "c.jsonl", DOCS)


@pytest.fixture
def cfg(corpus, cache_dir):
    return data_config(cache_dir, [corpus], seq_len=16, reset_attention_at_doc_boundary=True)


def global_sequence(cfg, tokenizer, n: int) -> np.ndarray:
    """Blocks of global samples 0..n-1, read by a single rank one sample at a time."""
    return np.concatenate([blocks_of(b) for b in take(build_loader(cfg, tokenizer), n)])


def rank_view(
    blocks: np.ndarray, rank: int, world: int, batch: int, steps: int, start: int = 0
) -> np.ndarray:
    """What rank `rank` of `world` must yield: micro-batch k holds samples start + (k*batch + i)*world + rank."""
    g = start + (np.arange(steps * batch) * world + rank)
    return blocks[g].reshape(steps, batch, -1)


@pytest.mark.parametrize(("world", "batch"), [(2, 3), (3, 1), (4, 2)])
def test_ranks_are_disjoint_and_cover_the_sequence(cfg, tokenizer, world: int, batch: int) -> None:
    steps = 12
    reference = global_sequence(cfg, tokenizer, steps * batch * world)
    seen = []
    for rank in range(world):
        loader = build_loader(cfg, tokenizer, dp_rank=rank, dp_world=world, micro_batch_size=batch)
        got = np.stack([blocks_of(b) for b in take(loader, steps)])
        assert np.array_equal(got, rank_view(reference, rank, world, batch, steps))
        seen.append(got.reshape(-1, cfg.block_len))
    # Together the ranks read every global sample exactly once (as positions: blocks may repeat text).
    union = np.concatenate(seen)
    assert sorted(map(tuple, union)) == sorted(map(tuple, reference))


def test_ranks_together_cover_an_epoch_of_tokens(cfg, tokenizer) -> None:
    ref = reference_stream(tokenizer, DOCS)
    n_epoch0 = -(-len(ref) // cfg.block_len)
    world = 2
    per_rank = -(-n_epoch0 // world)
    blocks = []
    for rank in range(world):
        loader = build_loader(cfg, tokenizer, dp_rank=rank, dp_world=world, micro_batch_size=1)
        blocks += [blocks_of(b)[0] for b in take(loader, per_rank)]
    epoch0 = [tuple(b) for b in blocks]  # rank r, step k is global sample k*world + r
    epoch0 = [epoch0[r * per_rank + k] for k in range(per_rank) for r in range(world)][:n_epoch0]
    expected = np.tile(ref, 2)[: n_epoch0 * cfg.block_len].reshape(n_epoch0, -1)
    assert sorted(epoch0) == sorted(map(tuple, expected))


def assert_batches_equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("prefetch", [0, 3])
def test_restore_mid_epoch_continues_with_the_next_samples(cfg, tokenizer, prefetch: int) -> None:
    cfg.prefetch_batches = prefetch
    for rank in range(2):
        uninterrupted = take(build_loader(cfg, tokenizer, dp_rank=rank, dp_world=2, micro_batch_size=2), 10)
        first = build_loader(cfg, tokenizer, dp_rank=rank, dp_world=2, micro_batch_size=2)
        head = take(first, 4)
        state = first.state_dict()
        take(first, 3)  # the crashed run went on; the checkpoint does not know
        resumed = build_loader(cfg, tokenizer, dp_rank=rank, dp_world=2, micro_batch_size=2)
        resumed.load_state_dict(state)
        assert_batches_equal(head + take(resumed, 6), uninterrupted)


@pytest.mark.parametrize(("world", "batch"), [(1, 4), (4, 1), (3, 2)])
def test_restore_with_another_number_of_ranks(cfg, tokenizer, world: int, batch: int) -> None:
    saved_world, saved_batch, steps = 2, 2, 5
    reference = global_sequence(cfg, tokenizer, 200)
    states = []
    for rank in range(saved_world):
        loader = build_loader(
            cfg, tokenizer, dp_rank=rank, dp_world=saved_world, micro_batch_size=saved_batch
        )
        take(loader, steps)
        states.append(loader.state_dict())
    assert states[0] == states[1]  # every rank saves the same state
    start = steps * saved_batch * saved_world
    for rank in range(world):
        loader = build_loader(cfg, tokenizer, dp_rank=rank, dp_world=world, micro_batch_size=batch)
        loader.load_state_dict(states[0])
        got = np.stack([blocks_of(b) for b in take(loader, 6)])
        assert np.array_equal(got, rank_view(reference, rank, world, batch, 6, start=start))


def test_epochs_advance_and_reshuffle(cfg, tokenizer) -> None:
    loader = build_loader(cfg, tokenizer, micro_batch_size=1)
    n_epoch0 = -(-loader.dataset.num_tokens // cfg.block_len)
    blocks = [blocks_of(b)[0] for b in take(loader, 3 * n_epoch0)]
    assert loader.state_dict()["epoch"] >= 2
    assert loader.state_dict()["source_epochs"] == [loader.state_dict()["epoch"]]
    # The same text comes back in a new order: compare where each block of epoch 0 reappears.
    first = [tuple(b) for b in blocks[:n_epoch0]]
    second = [tuple(b) for b in blocks[n_epoch0 : 2 * n_epoch0]]
    assert first != second


def test_prefetching_yields_what_on_demand_assembly_yields(cfg, tokenizer) -> None:
    cfg.prefetch_batches = 0
    on_demand = take(build_loader(cfg, tokenizer, dp_rank=1, dp_world=2, micro_batch_size=3), 8)
    cfg.prefetch_batches = 4
    loader = build_loader(cfg, tokenizer, dp_rank=1, dp_world=2, micro_batch_size=3)
    prefetched = take(loader, 8)
    loader.close()
    assert_batches_equal(prefetched, on_demand)


def test_state_of_another_sequence_is_rejected(cfg, tokenizer) -> None:
    loader = build_loader(cfg, tokenizer)
    next(loader)
    state = loader.state_dict()
    cfg.seq_len = 32
    with pytest.raises(ValueError, match="seq_len: saved 16, now 32"):
        build_loader(cfg, tokenizer).load_state_dict(state)


def _doc_numbers(tokenizer, stream) -> list[int]:
    """The `doc N:` numbers of the documents in a stream (make_docs numbers its documents)."""
    tokens = stream.store.read(stream.start, stream.start + stream.num_tokens)
    ends = np.flatnonzero(tokens == tokenizer.eos_token_id)
    texts = [tokenizer.decode(d) for d in np.split(tokens, ends + 1)[:-1]]
    return [int(t.split(":", 1)[0].removeprefix("doc ")) for t in texts]


def test_eval_split_is_drawn_by_document_hash_from_every_file_and_source(
    tmp_path, tokenizer, cache_dir
) -> None:
    """A directory source of 4 files and a second file sharing 50 of its documents: held-out documents
    come from every file of both sources (before: the tail of the sorted file list, i.e. the last file),
    and a document present in both sources is held out in both."""
    docs = make_docs(400)
    folder = tmp_path / "dir"
    folder.mkdir()
    for k in range(4):
        write_jsonl(folder / f"part{k}.jsonl", docs[k * 100 : (k + 1) * 100])
    write_jsonl(tmp_path / "other.jsonl", docs[:50] + make_docs(300, seed=5)[200:])
    cfg = data_config(cache_dir, [folder, tmp_path / "other.jsonl"], eval_fraction=0.1)
    held_out = build_loader(cfg, tokenizer, split="eval").dataset
    assert len(held_out.streams) == 2  # both sources take part in the eval mixture
    numbers = _doc_numbers(tokenizer, held_out.streams[0])
    assert {n // 100 for n in numbers} == {0, 1, 2, 3}  # every file of the directory
    from data.encode import is_eval_document

    expected = [i for i, d in enumerate(docs) if is_eval_document(d, 0.1)]
    assert numbers == expected and 20 <= len(expected) <= 60
    shared = [
        n for n in _doc_numbers(tokenizer, held_out.streams[1]) if n < 50 and docs[n].startswith(f"doc {n}:")
    ]
    assert shared == [n for n in expected if n < 50]  # the same documents held out in both sources
    train = build_loader(cfg, tokenizer, split="train").dataset.streams[0]
    assert sorted(_doc_numbers(tokenizer, train) + numbers) == list(range(400))


def test_data_seed_reorders_training_but_not_evaluation(tmp_path, tokenizer, cache_dir) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(200))
    first = {}
    for seed in (0, 1):
        cfg = data_config(cache_dir, [path], eval_fraction=0.2, seed=seed)
        first[seed] = {
            split: blocks_of(next(build_loader(cfg, tokenizer, split=split))) for split in ("train", "eval")
        }
    assert not np.array_equal(first[0]["train"], first[1]["train"])
    assert np.array_equal(first[0]["eval"], first[1]["eval"])


def test_mixture_serves_each_source_its_share_of_its_own_blocks(tmp_path, tokenizer, cache_dir) -> None:
    small = write_jsonl(tmp_path / "small.jsonl", make_docs(10, seed=1))
    large = write_jsonl(tmp_path / "large.jsonl", make_docs(60, seed=2))
    cfg = data_config(cache_dir, [small, large], mixture_window=8)
    cfg.sources[0].weight, cfg.sources[1].weight = 3.0, 1.0
    loader = build_loader(cfg, tokenizer, micro_batch_size=8)
    blocks = np.concatenate([blocks_of(b) for b in take(loader, 30)])
    refs = [reference_stream(tokenizer, make_docs(n, seed=s)) for n, s in ((10, 1), (60, 2))]
    source, local = loader.dataset.mixture.locate(np.arange(len(blocks)))
    assert np.bincount(source).tolist() == [180, 60]  # 3:1 of 240 samples
    L = cfg.block_len
    for s, ref in enumerate(refs):
        mine, p = blocks[source == s], local[source == s]
        assert sorted(p.tolist()) == list(range(len(p)))  # the source's first samples, none skipped
        # Sample p of source s is block block_of(p) of that source's own endless packed stream.
        b = loader.dataset.streams[s].block_of(p)
        periodic = np.tile(ref, (b.max() + 1) * L // len(ref) + 2)
        assert np.array_equal(mine, np.stack([periodic[x * L : (x + 1) * L] for x in b]))
    assert loader.state_dict()["source_epochs"][0] > loader.state_dict()["source_epochs"][1]


def test_rank_arguments_are_checked(cfg, tokenizer) -> None:
    with pytest.raises(ValueError, match="dp_rank=2"):
        build_loader(cfg, tokenizer, dp_rank=2, dp_world=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        build_loader(cfg, tokenizer, micro_batch_size=0)


def test_builtin_source_loads_by_default(tokenizer, cache_dir) -> None:
    cfg = data_config(cache_dir, eval_fraction=0.05)
    assert cfg.sources == [SourceConfig()]
    train = build_loader(cfg, tokenizer).dataset
    held_out = build_loader(cfg, tokenizer, split="eval").dataset
    assert train.num_tokens > 100_000 and 0 < held_out.num_tokens < train.num_tokens / 5  # ~5% of 207 docs


EXIT_PROBE = """
import atexit, threading
# registered before data.loader's own handler, so it runs after it (atexit is LIFO)
atexit.register(lambda: print("prefetching at exit:", [t.name for t in threading.enumerate() if t.name == "data-prefetch"]))
import torch
from data.loader import _Prefetcher
prefetcher = _Prefetcher(lambda start: {"x": torch.arange(start, start + 4096)}, 0, 1, depth=2)
prefetcher.get()
"""  # and the process exits without stopping it


def test_prefetch_threads_are_stopped_before_interpreter_teardown() -> None:
    """A daemon prefetch thread still assembling a batch while the interpreter finalizes aborts the
    process after a finished run ("terminate called without an active exception", exit 134: seen in
    CI, 3 of 19 trainer runs on a loaded machine); every live one is stopped at exit."""
    import subprocess
    import sys

    from tests.train.runner import ROOT

    res = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "prefetching at exit: []" in res.stdout, res.stdout


def test_a_prefetcher_stopped_from_its_own_thread_does_not_wait_for_itself() -> None:
    """The garbage collector may free a loader (and stop its prefetcher) on any thread, the prefetch
    thread included; stopping must then only ask the thread to end, not wait for it (that spun forever,
    and the consumer's next `get` never returned)."""
    import threading

    from data.loader import _Prefetcher

    box: dict[str, _Prefetcher] = {}
    stopped = threading.Event()

    def assemble(start: int) -> dict[str, torch.Tensor]:
        if start == 1:  # the second batch: as if collected here
            while "p" not in box:  # the constructor has returned
                pass
            box["p"].stop()
            stopped.set()
        return {"x": torch.tensor([start])}

    box["p"] = _Prefetcher(assemble, 0, 1, depth=1)
    assert box["p"].get()["x"].item() == 0
    assert stopped.wait(timeout=30), "stop() called on the prefetch thread did not return"
    box["p"]._thread.join(timeout=30)
    assert not box["p"]._thread.is_alive()
    assert box["p"] not in _Prefetcher.live


def test_train_and_eval_loaders_of_a_run_tokenise_each_source_once(cfg, tokenizer, monkeypatch) -> None:
    """Tokenising a source yields both splits; the trainer's two loaders share them (before: the whole
    corpus was tokenised twice on every rank at start) and get the same tokens as separate builds."""
    from dataclasses import replace

    from data import dataset

    cfg = replace(cfg, eval_fraction=0.2, sources=[*cfg.sources, SourceConfig()])  # + the builtin corpus
    alone = {split: build_loader(cfg, tokenizer, split).dataset for split in ("train", "eval")}
    calls = []
    real = dataset.tokenise_source
    monkeypatch.setattr(dataset, "tokenise_source", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    untaken: dataset.Untaken = {}
    shared = {
        split: build_loader(cfg, tokenizer, split, untaken=untaken).dataset for split in ("train", "eval")
    }
    assert len(calls) == 2 and untaken == {}  # one call per source; every split handed out
    for split in ("train", "eval"):
        for a, b in zip(alone[split].streams, shared[split].streams, strict=True):
            assert np.array_equal(a.store.read(0, a.store.num_tokens), b.store.read(0, b.store.num_tokens))
    build_loader(cfg, tokenizer, "eval", untaken=untaken)  # asked again: tokenised again, not stale
    assert len(calls) == 4
