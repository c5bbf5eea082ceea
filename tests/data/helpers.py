"""Helpers for the data tests: small corpora on disk and plain reference computations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from data.config import DataConfig, SourceConfig

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def make_docs(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """Documents of 1..max_words words, each starting with its own number (so none repeat)."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({field: doc, "id": i}) + "\n")
    return path


def reference_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """Documents joined with EOS, tokenised one at a time through the plain Hugging Face call."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    return np.array(ids, dtype=np.int64)


def data_config(cache_dir: str, paths: list[Path] | None = None, **overrides) -> DataConfig:
    sources = [SourceConfig(path=str(p)) for p in paths] if paths else [SourceConfig()]
    defaults = dict(sources=sources, cache_dir=cache_dir, seq_len=16, eval_fraction=0.0, prefetch_batches=0)
    return DataConfig(**{**defaults, **overrides}).validate()


def blocks_of(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The seq_len + 1 token blocks a batch was cut from."""
    return torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1).numpy()


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]
