"""Prepared shards read back equal to on-the-fly tokenisation; damaged or mismatched shards are named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import SourceConfig
from data.dataset import build_dataset
from data.encode import is_eval_document
from data.loader import build_loader
from data.prepare import PrepareConfig, _auto_workers, prepare
from data.shards import INDEX
from data.sources import load_source
from data.tokenizer import train_builtin_tokenizer
from tests.data.helpers import data_config, make_docs, reference_stream, take, write_jsonl

REPO = Path(__file__).resolve().parents[2]
DOCS = make_docs(300, seed=3)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, cache_dir):
    """The builtin corpus and a jsonl corpus (with empty rows), prepared by 2 workers into small shards."""
    root = tmp_path_factory.mktemp("prepare")
    corpus = root / "c.jsonl"
    with open(corpus, "w") as f:
        for i, doc in enumerate(DOCS):
            f.write(json.dumps({"text": doc if i % 50 else ""}) + "\n")  # every 50th row empty
    cfg = data_config(cache_dir, eval_fraction=0.1, seq_len=64, prepared_dir=str(root / "prepared"))
    cfg.sources = [SourceConfig(), SourceConfig(path=str(corpus), weight=0.5)]
    result = prepare(
        PrepareConfig(data=cfg, num_workers=2, docs_per_task=16, shard_tokens=20_000, progress=False)
    )
    return cfg, result


def test_shards_hold_exactly_the_on_the_fly_tokens(prepared, tokenizer) -> None:
    cfg, result = prepared
    assert result.num_shards > 4  # several shards per source: boundaries are exercised
    from_shards = build_dataset(cfg, tokenizer, "train")
    cfg_fly = data_config(cfg.cache_dir, eval_fraction=0.1, seq_len=64, sources=cfg.sources)
    on_the_fly = build_dataset(cfg_fly, tokenizer, "train")
    for a, b in zip(from_shards.streams, on_the_fly.streams):
        assert a.store.num_tokens == b.store.num_tokens
        assert np.array_equal(a.store.read(0, a.store.num_tokens), b.store.read(0, b.store.num_tokens))
        assert np.array_equal(a.store.doc_offsets, b.store.doc_offsets)
    # ... and both equal plain per-document tokenisation (empty rows skipped, held-out ones apart).
    jsonl = from_shards.streams[1].store
    kept = [d for i, d in enumerate(DOCS) if i % 50]
    train_docs = [d for d in kept if not is_eval_document(d, 0.1)]
    assert 0 < len(train_docs) < len(kept)
    assert np.array_equal(jsonl.read(0, jsonl.num_tokens), reference_stream(tokenizer, train_docs))
    held_out = build_dataset(cfg, tokenizer, "eval")
    builtin_docs = sum(len(ds.streams[0].store.doc_offsets) - 1 for ds in (on_the_fly, held_out))
    assert result.num_docs == len(kept) + builtin_docs


@pytest.mark.parametrize("split", ["train", "eval"])
def test_loader_batches_from_shards_equal_on_the_fly(prepared, tokenizer, split: str) -> None:
    cfg, _ = prepared
    cfg_fly = data_config(
        cfg.cache_dir,
        eval_fraction=0.1,
        seq_len=64,
        sources=cfg.sources,
        reset_attention_at_doc_boundary=True,
    )
    cfg_prep = replace(cfg_fly, prepared_dir=cfg.prepared_dir)
    for batch_a, batch_b in zip(
        take(build_loader(cfg_prep, tokenizer, split, dp_rank=1, dp_world=2, micro_batch_size=4), 20),
        take(build_loader(cfg_fly, tokenizer, split, dp_rank=1, dp_world=2, micro_batch_size=4), 20),
    ):
        assert batch_a.keys() == batch_b.keys() == {"input_ids", "targets", "position_ids", "document_ids"}
        for k in batch_a:
            assert torch.equal(batch_a[k], batch_b[k])


def test_index_records_what_readers_check(prepared, tokenizer) -> None:
    cfg, result = prepared
    index = json.loads((result.path / INDEX).read_text())
    assert index["dtype"] == "<u2" and index["vocab_size"] == len(tokenizer)
    assert index["eos_token_id"] == tokenizer.eos_token_id
    assert index["eval_fraction"] == 0.1 and index["special_tokens"] == "text"
    for entry in index["sources"]:
        for split in entry["splits"].values():
            assert sum(s["num_tokens"] for s in split["shards"]) == split["num_tokens"]
            for shard in split["shards"]:
                assert (
                    (result.path / shard["file"]).stat().st_size == shard["bytes"] == 2 * shard["num_tokens"]
                )
    jsonl = index["sources"][1]
    assert jsonl["num_rows"] - sum(s["num_docs"] for s in jsonl["splits"].values()) == len(DOCS) // 50
    assert not [p for p in result.path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def copy_prepared(prepared, tmp_path) -> tuple:
    cfg, result = prepared
    target = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(result.path), str(target)], check=True)
    return replace(cfg, prepared_dir=str(target)), target


def a_middle_shard(root: Path) -> Path:
    return root / json.loads((root / INDEX).read_text())["sources"][0]["splits"]["train"]["shards"][2]["file"]


def test_corrupt_shard_is_named(prepared, tokenizer, tmp_path) -> None:
    cfg, root = copy_prepared(prepared, tmp_path)
    shard = a_middle_shard(root)
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard} is corrupt"):
        build_dataset(cfg, tokenizer, "train")
    cfg.verify_shards = False  # the cost of skipping the hash: a same-size corruption goes unseen
    build_dataset(cfg, tokenizer, "train")


def test_truncated_or_missing_shard_is_named(prepared, tokenizer, tmp_path) -> None:
    cfg, root = copy_prepared(prepared, tmp_path)
    cfg.verify_shards = False  # sizes are checked regardless
    shard = a_middle_shard(root)
    size = shard.stat().st_size
    os.truncate(shard, size - 2)
    with pytest.raises(ValueError, match=rf"{shard} is truncated: {size - 2} bytes"):
        build_dataset(cfg, tokenizer, "train")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard} is missing"):
        build_dataset(cfg, tokenizer, "train")


def test_missing_or_corrupt_index_is_named(prepared, tokenizer, tmp_path) -> None:
    cfg, root = copy_prepared(prepared, tmp_path)
    (root / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{root / INDEX} is corrupt"):
        build_dataset(cfg, tokenizer, "train")
    (root / INDEX).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{root / INDEX} is missing"):
        build_dataset(cfg, tokenizer, "train")
    cfg.prepared_dir = str(tmp_path / "never_prepared")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        build_dataset(cfg, tokenizer, "train")


def test_shards_of_another_tokenizer_or_sources_are_refused(prepared, tokenizer, tmp_path) -> None:
    cfg, _ = prepared
    other = train_builtin_tokenizer(vocab_size=1024)
    with pytest.raises(ValueError, match=r"maps text to ids differently from data\.tokenizer"):
        build_dataset(cfg, other, "train")
    swapped = replace(cfg, sources=cfg.sources[::-1])
    with pytest.raises(ValueError, match=r"holds sources .* but data\.sources are"):
        build_dataset(swapped, tokenizer, "train")
    reweighted = replace(cfg, sources=[cfg.sources[0], replace(cfg.sources[1], weight=3.0)])
    build_dataset(reweighted, tokenizer, "train")  # weights are a read-time choice


def test_existing_output_needs_overwrite(prepared, tmp_path, cache_dir) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    cfg = data_config(cache_dir, [write_jsonl(tmp_path / "c.jsonl", DOCS[:20])], prepared_dir=str(out))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        prepare(PrepareConfig(data=cfg, num_workers=1, progress=False))
    assert (out / "keep").exists()
    prepare(PrepareConfig(data=cfg, num_workers=1, progress=False, overwrite=True))
    assert (out / INDEX).exists() and not (out / "keep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]


def test_failed_prepare_leaves_nothing_behind(tmp_path, cache_dir) -> None:
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    cfg = data_config(cache_dir, [tmp_path / "blank.jsonl"], prepared_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"data\.sources\[0\].*empty or null"):
        prepare(PrepareConfig(data=cfg, num_workers=2, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl"]


def test_command_line(tmp_path, cache_dir, tokenizer) -> None:
    out = tmp_path / "cli"
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:50])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.prepare",
            f"data.sources.0.path={corpus}",
            f"data.prepared_dir={out}",
            f"data.cache_dir={cache_dir}",
            "data.eval_fraction=0",
            "num_workers=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"prepared {out}: 50 documents" in proc.stdout
    cfg = data_config(cache_dir, [corpus], prepared_dir=str(out))
    store = build_dataset(cfg, tokenizer, "train").streams[0].store
    assert np.array_equal(store.read(0, store.num_tokens), reference_stream(tokenizer, DOCS[:50]))


def test_worker_processes_and_in_process_write_identical_shards(tmp_path, cache_dir) -> None:
    """Three files: with 2 workers datasets converts them to Arrow on 2 processes too (a fresh Arrow
    cache each time), and the rows keep the files' order."""
    (tmp_path / "parts").mkdir()
    for k in range(3):
        write_jsonl(tmp_path / "parts" / f"{k}.jsonl", DOCS[k::3])
    corpus = str(tmp_path / "parts" / "*.jsonl")
    hashes = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cfg = data_config(
            cache_dir, [corpus], prepared_dir=str(out), datasets_cache_dir=str(tmp_path / f"a{workers}")
        )
        prepare(
            PrepareConfig(data=cfg, num_workers=workers, docs_per_task=7, shard_tokens=3000, progress=False)
        )
        index = json.loads((out / INDEX).read_text())
        hashes.append([(s["file"], s["sha256"]) for s in index["sources"][0]["splits"]["train"]["shards"]])
    assert len(hashes[0]) > 1 and hashes[0] == hashes[1]
    assert len(list((tmp_path / "a2").rglob("*.arrow"))) == 2  # converted by 2 processes (1 before)


def test_small_inputs_are_tokenised_in_process(cache_dir) -> None:
    builtin = load_source(SourceConfig(), 0, cache_dir)
    assert _auto_workers([builtin]) == 1
