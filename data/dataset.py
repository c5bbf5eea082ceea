"""The packed dataset: global sample index -> one block of `seq_len + 1` tokens from the weighted mixture.

Tokens come from prepared shards (`DataConfig.prepared_dir`) or are tokenised in memory on the fly;
both paths produce the same token stores, so they yield the same samples. Splits are token ranges of
each source: the eval split is its last `eval_fraction` of documents (`token_store.split_range`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from data.config import DataConfig, Split
from data.encode import encode_documents, token_dtype
from data.mixture import Mixture
from data.shards import open_source, read_index
from data.sources import load_source
from data.stream import PackedStream
from data.token_store import InMemoryTokens, TokenStore, split_range
from data.tokenizer import fingerprint

_SPLIT_KEY = {Split.train: 0, Split.eval: 1}
_MIXTURE_KEY = 0x6D6978  # keeps the mixture's permutations apart from the streams'
_ENCODE_BATCH = 1024  # documents per encode_batch call


class PackedDataset:
    """Random access to the global sample sequence of one split.

    Args:
        streams: one packed stream per source.
        mixture: how global samples are dealt to the streams.
        identity: everything that determines the sample sequence (checked when a loader resumes).
    """

    def __init__(self, streams: list[PackedStream], mixture: Mixture, identity: dict[str, Any]):
        self.streams = streams
        self.mixture = mixture
        self.identity = identity
        self.block_len = streams[0].block_len
        self.num_tokens = sum(s.num_tokens for s in streams)

    def read(self, g: np.ndarray, out: np.ndarray) -> None:
        """Write the blocks of global samples `g` [N] into `out` [N, block_len]."""
        source, local = self.mixture.locate(g)
        for s in np.unique(source):
            rows = np.flatnonzero(source == s)
            stream = self.streams[s]
            for row, block in zip(rows, stream.block_of(local[rows])):
                stream.read_block(int(block), out[row])

    def epoch(self, g: int) -> int:
        """Passes over the whole split (all sources' tokens) completed before global sample g."""
        return g * self.block_len // self.num_tokens

    def source_epochs(self, g: int) -> list[int]:
        """Each source's own epoch at global sample g (sources cycle at their own pace in a mixture)."""
        consumed = self.mixture.consumed(g)
        return [int(stream.epoch_of(consumed[s])) for s, stream in enumerate(self.streams)]


def build_dataset(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, split: Split | str) -> PackedDataset:
    """Load (or tokenise) every source and pack the requested split.

    Raises:
        FileNotFoundError: missing source files or prepared shards.
        ValueError: empty sources or splits, missing text fields, prepared data that does not match
            the config or the tokenizer, corrupt shards.
    """
    cfg.validate()
    split = Split(split)
    stores = _prepared_stores(cfg, tokenizer) if cfg.prepared_dir else _tokenised_stores(cfg, tokenizer)
    # the eval order ignores data.seed: runs that differ only in seed are scored on the same batches
    seed = cfg.seed if split is Split.train else 0
    streams = []
    for i, store in enumerate(stores):
        start, stop = split_range(store.doc_offsets, cfg.eval_fraction, split.value)
        if stop <= start:
            why = (
                "data.eval_fraction=0 holds nothing out"
                if cfg.eval_fraction == 0
                else "it has a single document"
            )
            raise ValueError(
                f"data.sources[{i}] (path={cfg.sources[i].path!r}) has an empty {split.value} split: {why}"
            )
        key = (seed, i, _SPLIT_KEY[split])
        streams.append(PackedStream(store, start, stop, cfg.block_len, key))
    mixture = Mixture(
        [s.weight for s in cfg.sources], cfg.mixture_window, (seed, _SPLIT_KEY[split], _MIXTURE_KEY)
    )
    identity = {
        "split": split.value,
        "seq_len": cfg.seq_len,
        "seed": seed,
        "tokenizer": fingerprint(tokenizer),
        "sources": [s.identity() for s in cfg.sources],
        "source_tokens": [s.num_tokens for s in streams],
        "weights": [float(s.weight) for s in cfg.sources],
        "mixture_window": cfg.mixture_window,
    }
    return PackedDataset(streams, mixture, identity)


def tokenise_source(
    dataset: Any, text_field: str, tokenizer: PreTrainedTokenizerFast, where: str
) -> InMemoryTokens:
    """Tokenise a `datasets.Dataset` in memory, the way `data.prepare` does in its workers."""
    dtype = token_dtype(len(tokenizer))
    eos = int(tokenizer.eos_token_id)
    tokens, lengths = [], []
    for batch in dataset.iter(batch_size=_ENCODE_BATCH):
        t, n = encode_documents(tokenizer.backend_tokenizer, batch[text_field], eos, dtype, where)
        tokens.append(t)
        lengths.append(n)
    return InMemoryTokens(np.concatenate(tokens), np.concatenate(lengths))


def _tokenised_stores(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> list[TokenStore]:
    stores: list[TokenStore] = []
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}] (path={src.path!r})"
        store = tokenise_source(load_source(src, i, cfg.cache_dir), src.text_field, tokenizer, where)
        if store.num_tokens == 0:
            raise ValueError(f"{where}: every document in {src.text_field!r} is empty or null")
        stores.append(store)
    return stores


def _prepared_stores(cfg: DataConfig, tokenizer: PreTrainedTokenizerFast) -> list[TokenStore]:
    assert cfg.prepared_dir is not None
    root = Path(cfg.prepared_dir).expanduser()
    index = read_index(root)
    where = f"data.prepared_dir={str(root)!r}"
    if index["tokenizer"]["fingerprint"] != fingerprint(tokenizer):
        raise ValueError(
            f"{where} was tokenised with tokenizer {index['tokenizer']['name']!r}, which maps text to ids "
            f"differently from data.tokenizer={cfg.tokenizer!r}; prepare it again or use that tokenizer"
        )
    if index["eos_token_id"] != tokenizer.eos_token_id:
        raise ValueError(
            f"{where} joins documents with EOS id {index['eos_token_id']}, the tokenizer's is {tokenizer.eos_token_id}"
        )
    prepared = [e["source"] for e in index["sources"]]
    wanted = [s.identity() for s in cfg.sources]
    if prepared != wanted:
        raise ValueError(f"{where} holds sources {prepared}, but data.sources are {wanted} (weights aside)")
    dtype = np.dtype(index["dtype"])
    return [open_source(root, entry, dtype, cfg.verify_shards) for entry in index["sources"]]
