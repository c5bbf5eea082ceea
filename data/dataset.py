"""The packed dataset: global sample index -> one block of `seq_len + 1` tokens from the weighted mixture.

Tokens come from prepared shards (`DataConfig.prepared_dir`) or are tokenised in memory on the fly;
both paths produce the same token stores, so they yield the same samples. Every source has a train
and an eval store: the eval documents are held out by a hash of their text (`data.encode`). Sources
with no held-out document are left out of the eval mixture.

Mixture phases: a resumed run may change the weights (`DataConfig.new_mixture_on_resume`); the new
mixture then starts at global sample 0 with `source_offsets`, past the samples each source had
served (the rest of a window entered is skipped: `Mixture.reserved`), so nothing is served twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from data.config import DataConfig, Split
from data.encode import encode_documents, split_documents, text_tokenizer, token_dtype
from data.mixture import Mixture
from data.shards import open_prepared
from data.sources import load_source
from data.stream import PackedStream
from data.token_store import InMemoryTokens, TokenStore
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
        self.source_offsets = np.zeros(len(streams), dtype=np.int64)
        """Samples each source had served before this mixture phase began."""

    def read(self, g: np.ndarray, out: np.ndarray) -> None:
        """Write the blocks of global samples `g` [N] into `out` [N, block_len]."""
        source, local = self.mixture.locate(g)
        local = local + self.source_offsets[source]
        for s in np.unique(source):
            rows = np.flatnonzero(source == s)
            stream = self.streams[s]
            for row, block in zip(rows, stream.block_of(local[rows])):
                stream.read_block(int(block), out[row])

    def consumed(self, g: int) -> np.ndarray:
        """Samples each source has served before global sample g, earlier phases included."""
        return self.source_offsets + self.mixture.consumed(g)

    def epoch(self, g: int) -> int:
        """Passes over the whole split (all sources' tokens) completed before global sample g."""
        return int(self.consumed(g).sum()) * self.block_len // self.num_tokens

    def source_epochs(self, g: int) -> list[int]:
        """Each source's own epoch at global sample g (sources cycle at their own pace in a mixture)."""
        consumed = self.consumed(g)
        return [int(stream.epoch_of(consumed[s])) for s, stream in enumerate(self.streams)]


def build_dataset(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerFast,
    split: Split | str,
    untaken: Untaken | None = None,
    hash_share: tuple[int, int] = (0, 1),
) -> PackedDataset:
    """Load (or tokenise) every source and pack the requested split.

    A prepared directory without a valid stamp is hashed: wholly by one process, or the `hash_share`
    = (dp_rank, dp_world) of a data-parallel job (`data.shards.PreparedDir.verify`); sizes are
    checked everywhere.

    Tokenising a source (without `prepared_dir`) yields both splits; pass the same `untaken` dict to
    the train and the eval call and each source is tokenised once: the other split waits there, handed
    out once.

    Raises:
        FileNotFoundError: missing source files or prepared shards.
        ValueError: empty sources or splits, missing text fields, prepared data that does not match
            the config or the tokenizer, corrupt shards.
    """
    cfg.validate()
    split = Split(split)
    stores = (
        _prepared_stores(cfg, tokenizer, split, hash_share)
        if cfg.prepared_dir
        else _tokenised_stores(cfg, tokenizer, split, {} if untaken is None else untaken)
    )
    # the eval order ignores data.seed: runs that differ only in seed are scored on the same batches
    seed = cfg.seed if split is Split.train else 0
    kept = [i for i, store in enumerate(stores) if store.num_tokens > 0]
    if split is Split.train and len(kept) < len(stores):
        i = next(i for i, store in enumerate(stores) if store.num_tokens == 0)
        raise ValueError(
            f"data.sources[{i}] (path={cfg.sources[i].path!r}) has an empty train split: every document is "
            f"held out (data.eval_fraction={cfg.eval_fraction})"
        )
    if not kept:
        why = (
            "data.eval_fraction=0 holds nothing out"
            if cfg.eval_fraction == 0
            else f"data.eval_fraction={cfg.eval_fraction} held out no document of any source"
        )
        raise ValueError(f"the {split.value} split is empty: {why}")
    streams = [
        PackedStream(stores[i], 0, stores[i].num_tokens, cfg.block_len, (seed, i, _SPLIT_KEY[split]))
        for i in kept
    ]
    weights = [cfg.sources[i].weight for i in kept]
    mixture = Mixture(weights, cfg.mixture_window, (seed, _SPLIT_KEY[split], _MIXTURE_KEY))
    identity = {
        "split": split.value,
        "seq_len": cfg.seq_len,
        "seed": seed,
        "tokenizer": fingerprint(tokenizer),
        "sources": [cfg.sources[i].identity() for i in kept],
        "source_tokens": [s.num_tokens for s in streams],
        "eval_fraction": cfg.eval_fraction,
        "weights": [float(w) for w in weights],
        "mixture_window": cfg.mixture_window,
    }
    return PackedDataset(streams, mixture, identity)


def tokenise_source(
    dataset: Any,
    text_field: str,
    tokenizer: PreTrainedTokenizerFast,
    where: str,
    eval_fraction: float = 0.0,
) -> dict[str, InMemoryTokens]:
    """Tokenise a `datasets.Dataset` in memory, the way `data.prepare` does in its workers.

    Returns:
        `{"train": ..., "eval": ...}`, the documents on each side of the hash split.
    """
    dtype = token_dtype(len(tokenizer))
    eos = int(tokenizer.eos_token_id)
    backend = text_tokenizer(tokenizer.backend_tokenizer)
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"train": ([], []), "eval": ([], [])}
    for batch in dataset.iter(batch_size=_ENCODE_BATCH):
        for name, texts in split_documents(batch[text_field], eval_fraction).items():
            t, n = encode_documents(backend, texts, eos, dtype, where)
            parts[name][0].append(t)
            parts[name][1].append(n)
    return {
        name: InMemoryTokens(_concat(tokens, dtype), _concat(lengths, np.dtype(np.int64)))
        for name, (tokens, lengths) in parts.items()
    }


def _concat(arrays: Sequence[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype)


Untaken = dict[tuple[Any, ...], dict[str, InMemoryTokens]]
"""Splits tokenised along with the one asked for, kept for a later call (`build_dataset`'s `untaken`)."""


def _tokenised_stores(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, split: Split, untaken: Untaken
) -> list[TokenStore]:
    stores: list[TokenStore] = []
    for i, src in enumerate(cfg.sources):
        where = f"data.sources[{i}] (path={src.path!r})"
        key = (*src.identity().values(), cfg.eval_fraction, cfg.datasets_cache, fingerprint(tokenizer))
        parts = untaken.pop(key, {})
        if split.value not in parts:
            parts = tokenise_source(
                load_source(src, i, cfg.datasets_cache), src.text_field, tokenizer, where, cfg.eval_fraction
            )
            if parts["train"].num_tokens == 0 and parts["eval"].num_tokens == 0:
                raise ValueError(f"{where}: every document in {src.text_field!r} is empty or null")
        stores.append(parts.pop(split.value))
        if parts:
            untaken[key] = parts
    return stores


def _prepared_stores(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerFast, split: Split, hash_share: tuple[int, int]
) -> list[TokenStore]:
    assert cfg.prepared_dir is not None
    root = Path(cfg.prepared_dir).expanduser()
    prepared = open_prepared(root, cfg.max_open_shards)
    index = prepared.index
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
    sources = [e["source"] for e in index["sources"]]
    wanted = [s.identity() for s in cfg.sources]
    if sources != wanted:
        raise ValueError(f"{where} holds sources {sources}, but data.sources are {wanted} (weights aside)")
    if index["eval_fraction"] != cfg.eval_fraction:
        raise ValueError(
            f"{where} was prepared with eval_fraction={index['eval_fraction']}, but data.eval_fraction="
            f"{cfg.eval_fraction}: the held-out documents are chosen when preparing; prepare it again "
            "or use that fraction"
        )
    if cfg.verify_shards:
        prepared.verify(hash_share, Path(cfg.cache_dir).expanduser())
    return [prepared.store(i, split.value) for i in range(len(sources))]
