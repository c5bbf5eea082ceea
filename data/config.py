"""Data configuration: which text to read, how to tokenise it and how to pack it into training samples.

Design choices:
- One schema serves training and `python -m data.prepare`: the prepared directory is just another
  field (`prepared_dir`), so preparing and training read the same `data=<preset>` Hydra group.
- Mixture weights, the seed and `seq_len` are read-time choices: prepared shards hold whole
  sources, so they can change without re-tokenising (weights even on resume, with
  `new_mixture_on_resume`). The held-out fraction is fixed when preparing: the split is made while
  tokenising, so that reading never scans the corpus.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional

BUILTIN = "builtin"
"""The value of `SourceConfig.path` and `DataConfig.tokenizer` that selects the embedded corpus / tokenizer."""


class Split(str, enum.Enum):
    """Which part of every source a loader reads."""

    train = "train"
    eval = "eval"  # the documents of every source held out by a hash of their text (`eval_fraction`)


class TxtSampleBy(str, enum.Enum):
    """What one document is in a `.txt` source (Hugging Face's `text` builder `sample_by`)."""

    line = "line"
    paragraph = "paragraph"
    document = "document"  # one file, one document


@dataclass(kw_only=True)
class SourceConfig:
    """One text source of the mixture."""

    path: str = BUILTIN
    """Local file, directory or glob (jsonl/json, parquet, csv, txt, arrow, a `save_to_disk` folder), a Hub
    dataset name, or "builtin" (Python's own documentation, see `data.corpus`)."""
    text_field: str = "text"
    """Column holding the document text."""
    weight: float = 1.0
    """Relative share of the mixture's samples (normalised over sources)."""
    split: str = "train"
    """Hugging Face split to read (local files have only "train")."""
    subset: Optional[str] = None
    """Hub dataset configuration name (`load_dataset(path, name=subset)`), if it has several."""
    txt_sample_by: TxtSampleBy = TxtSampleBy.line
    """For `.txt` files: one document per line, paragraph or file."""

    def identity(self) -> dict[str, Optional[str]]:
        """What determines the tokens of this source (everything but the weight)."""
        return {
            "path": self.path,
            "text_field": self.text_field,
            "split": self.split,
            "subset": self.subset,
            "txt_sample_by": TxtSampleBy(self.txt_sample_by).value,
        }


@dataclass(kw_only=True)
class DataConfig:
    """Sources, tokenizer and packing of the training data. Defaults are the embedded corpus."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    """The mixture; at least one source."""
    tokenizer: str = BUILTIN
    """Local tokenizer directory or Hub name (any fast Hugging Face tokenizer), or "builtin"."""
    seq_len: int = 256
    """Tokens per training sample; packed blocks hold `seq_len + 1` tokens (inputs and shifted targets)."""
    seed: int = 0
    """Seeds the training split's per-epoch block order and mixture interleaving (the eval split's
    order is fixed, so runs that differ only in seed are evaluated on the same batches)."""
    eval_fraction: float = 0.05
    """Fraction of the documents held out as the eval split, drawn by a hash of each document's text
    (so from every file of every source, the same in every run); 0 disables it. Prepared data fixes
    it when preparing: a different value is refused when reading."""
    reset_attention_at_doc_boundary: bool = False
    """Also yield `position_ids` and `document_ids` that restart after every EOS."""
    prepared_dir: Optional[str] = None
    """Read pre-tokenised shards from here (written by `python -m data.prepare`) instead of tokenising."""
    verify_shards: bool = True
    """Check the sha256 of every prepared shard once: `data.prepare` stamps its output, and a reader
    that finds no valid stamp (a copied directory, a rewritten file) hashes every file once (~1 s/GB)
    and stamps it. Sizes are checked at every open regardless."""
    max_open_shards: int = 64
    """Shard files this process keeps open at most, shared by its train and eval loaders."""
    cache_dir: str = "~/.cache/finemoe"
    """Where the builtin tokenizer (and, by default, Hugging Face's dataset cache) live."""
    datasets_cache_dir: Optional[str] = None
    """Hugging Face datasets' cache: its Arrow copy of local text files (as large as the text) and
    Hub downloads. Default `<cache_dir>/datasets`; put it on scratch space for a large corpus."""
    mixture_window: int = 1024
    """Samples per mixture window; each source gets a fixed quota of every window (by weight)."""
    prefetch_batches: int = 2
    """Micro-batches a background thread assembles ahead of the trainer; 0 assembles on demand."""
    new_mixture_on_resume: bool = False
    """Accept changed source weights or `mixture_window` when resuming (an annealing phase): the model
    and optimizer state continue, and the mixture starts a new position from which every source
    continues where it stopped, so nothing is repeated (a change mid-window skips the rest of that
    window, at most one window's share per source). Without it such a change is refused."""

    @property
    def datasets_cache(self) -> str:
        """Hugging Face datasets' cache directory (`datasets_cache_dir` or `<cache_dir>/datasets`)."""
        return self.datasets_cache_dir or f"{self.cache_dir.rstrip('/')}/datasets"

    @property
    def block_len(self) -> int:
        """Tokens per packed block: `seq_len` inputs plus the last target."""
        return self.seq_len + 1

    def validate(self) -> DataConfig:
        """Raise ValueError naming the first offending field. Returns self for chaining."""
        if not self.sources:
            raise ValueError("data.sources must hold at least one source")
        for i, src in enumerate(self.sources):
            if not src.path:
                raise ValueError(f"data.sources[{i}].path must not be empty")
            if not src.text_field:
                raise ValueError(f"data.sources[{i}].text_field must not be empty")
            if not src.split:
                raise ValueError(f"data.sources[{i}].split must not be empty")
            if not (math.isfinite(src.weight) and src.weight > 0):
                raise ValueError(f"data.sources[{i}].weight must be positive and finite, got {src.weight}")
            try:
                TxtSampleBy(src.txt_sample_by)
            except ValueError:
                choices = ", ".join(c.value for c in TxtSampleBy)
                raise ValueError(
                    f"data.sources[{i}].txt_sample_by={src.txt_sample_by!r} is unknown; choose one of {choices}"
                ) from None
        if not self.tokenizer:
            raise ValueError("data.tokenizer must not be empty")
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be positive, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.mixture_window < len(self.sources):
            raise ValueError(
                f"data.mixture_window={self.mixture_window} must be >= the number of sources ({len(self.sources)})"
            )
        if self.prefetch_batches < 0:
            raise ValueError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if self.prepared_dir is not None and not self.prepared_dir:
            raise ValueError("data.prepared_dir must be null or a directory, got an empty string")
        if self.datasets_cache_dir is not None and not self.datasets_cache_dir:
            raise ValueError("data.datasets_cache_dir must be null or a directory, got an empty string")
        if self.max_open_shards < 1:
            raise ValueError(f"data.max_open_shards must be positive, got {self.max_open_shards}")
        return self
