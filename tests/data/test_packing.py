"""Packing wastes no token: every token of every document appears once per epoch, in document order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.loader import build_loader, document_positions
from data.stream import PackedStream
from data.token_store import InMemoryTokens
from tests.data.helpers import blocks_of, data_config, make_docs, reference_stream, take, write_jsonl

EOS = 0


def numbered_store(doc_lengths: list[int]) -> InMemoryTokens:
    """Token values are stream positions + 1 (unique), except each document's last token, EOS = 0."""
    lengths = np.array(doc_lengths)
    tokens = np.arange(1, lengths.sum() + 1, dtype=np.int64)
    tokens[np.cumsum(lengths) - 1] = EOS
    return InMemoryTokens(tokens, lengths)


def epoch_blocks(stream: PackedStream, epoch: int) -> np.ndarray:
    first, stop = stream.first_block(np.array([epoch, epoch + 1]))
    out = np.empty((stop - first, stream.block_len), dtype=np.int64)
    for row, block in enumerate(stream.block_of(np.arange(first, stop))):
        stream.read_block(int(block), out[row])
    return out


@pytest.mark.parametrize("block_len", [1, 5, 17, 64, 1000])
def test_every_token_exactly_once_per_epoch_in_order(block_len: int) -> None:
    rng = np.random.default_rng(block_len)
    store = numbered_store(list(rng.integers(1, 40, size=50)))
    T, L = store.num_tokens, block_len
    stream = PackedStream(store, 0, T, L, key=(0, 0, 0))
    position = {int(v): p for p, v in enumerate(store.tokens) if v != EOS}
    for epoch in range(3):
        blocks = epoch_blocks(stream, epoch)
        first = -(-epoch * T // L)
        # The epoch's blocks are the stream positions [first*L, (first + n)*L) of the endless stream,
        # i.e. pass `epoch` (T tokens) plus the part of the next pass the straddling block carries.
        expected = np.sort(np.tile(store.tokens, 3 + L // T)[first * L % T :][: len(blocks) * L])
        assert np.array_equal(np.sort(blocks.ravel()), expected)
        assert len(blocks) * L - T in range(-L + 1, L)
        # Within a block, tokens are consecutive stream positions: document order is kept.
        for block in blocks:
            pos = [position.get(int(v)) for v in block]
            known = [(i, p) for i, p in enumerate(pos) if p is not None]
            for (i, p), (j, q) in zip(known, known[1:]):
                assert (q - p) % T == j - i


def test_epochs_are_reshuffled_deterministically() -> None:
    store = numbered_store([7] * 100)  # T = 700, L = 8: epoch 0 is samples 0..87, epoch 1 88..174
    make = lambda seed: PackedStream(store, 0, store.num_tokens, 8, key=(seed, 0, 0))  # noqa: E731
    a, b, other_seed = make(0), make(0), make(1)
    epoch0, epoch1 = a.block_of(np.arange(0, 88)), a.block_of(np.arange(88, 175))
    assert sorted(epoch0) == list(range(0, 88)) and sorted(epoch1) == list(range(88, 175))
    assert np.array_equal(epoch0, b.block_of(np.arange(0, 88)))
    assert not np.array_equal(epoch0, np.arange(88))
    assert not np.array_equal(epoch0[:87], epoch1 - 88)
    assert not np.array_equal(epoch0, other_seed.block_of(np.arange(0, 88)))


def test_stream_shorter_than_a_block_wraps_around() -> None:
    store = numbered_store([2, 3])  # T = 5 < L = 12
    stream = PackedStream(store, 0, 5, 12, key=(0, 0, 0))
    out = np.empty(12, dtype=np.int64)
    stream.read_block(1, out)
    assert np.array_equal(out, np.tile(store.tokens, 6)[12:24])


def test_loader_packs_tokenised_documents_without_padding_or_loss(tmp_path, tokenizer, cache_dir) -> None:
    docs = make_docs(40, max_words=30)
    cfg = data_config(cache_dir, [write_jsonl(tmp_path / "c.jsonl", docs)], seq_len=24)
    ref = reference_stream(tokenizer, docs)
    T, L = len(ref), cfg.block_len
    loader = build_loader(cfg, tokenizer, micro_batch_size=1)
    n_epoch0 = -(-T // L)
    blocks = np.concatenate([blocks_of(b) for b in take(loader, n_epoch0)])
    periodic = np.tile(ref, 2)
    expected = periodic[: n_epoch0 * L].reshape(n_epoch0, L)
    assert sorted(map(tuple, blocks)) == sorted(map(tuple, expected))
    assert loader.state_dict()["epoch"] == 1


def test_targets_are_inputs_shifted_by_one(tokenizer, cache_dir) -> None:
    loader = build_loader(data_config(cache_dir, seq_len=32), tokenizer, micro_batch_size=3)
    batch = next(loader)
    assert batch["input_ids"].shape == batch["targets"].shape == (3, 32)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert set(batch) == {"input_ids", "targets"}


def test_position_and_document_ids_restart_after_every_eos(tmp_path, tokenizer, cache_dir) -> None:
    eos = tokenizer.eos_token_id
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(60, max_words=20))
    cfg = data_config(cache_dir, [path], seq_len=128, reset_attention_at_doc_boundary=True)
    batch = next(build_loader(cfg, tokenizer, micro_batch_size=4))
    ids = batch["input_ids"].numpy()
    assert (ids == eos).sum() > 4  # several documents per row: the test means something
    for row, pos_row, doc_row in zip(ids, batch["position_ids"].numpy(), batch["document_ids"].numpy()):
        pos = doc = 0
        for t, token in enumerate(row):
            assert (pos_row[t], doc_row[t]) == (pos, doc)
            pos, doc = (0, doc + 1) if token == eos else (pos + 1, doc)


def test_document_positions_on_a_hand_made_row() -> None:
    ids = np.array([[5, 0, 7, 8, 0, 0, 9]])
    pos, doc = document_positions(ids, eos_token_id=0)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 0]]
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2, 3]]
