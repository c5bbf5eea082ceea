"""Calibration tokens: the inputs on which the upcycled model is compared with the dense one.

Design choices:
- Text comes from `upcycle.calibration.path` (plain text files, one document each, or JSON lines,
  one document per line) and is tokenised with the tokenizer shipped in the source directory, so
  the numbers are on the model's own kind of input. Documents are joined with the EOS token and
  cut into `num_sequences` blocks of `seq_len` tokens; reading stops once there are enough.
- Without a path, or without a tokenizer the source can load, the tokens are a fixed set of random
  ids (a generator seeded with 0, not with `upcycle.seed`), so runs that differ in seed are measured
  on the same tokens. The report says which was used and why.
- Everything here runs before the first byte is written, so a bad path is an error, not a lost run.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moe.hf import TOKENIZER_FILES
from upcycle.config import CalibrationConfig

RANDOM_IDS_SEED = 0
_JSON_SUFFIXES = (".jsonl", ".json")


def calibration_files(cfg: CalibrationConfig) -> list[Path]:
    """The files `cfg.path` names: a file, a directory (its files, sorted) or a glob (sorted).

    Raises:
        ValueError: when nothing matches, naming `upcycle.calibration.path`.
    """
    if cfg.path is None:
        return []
    path = Path(cfg.path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"upcycle.calibration.path={cfg.path!r}: no file matches")
    return files


def _documents(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if path.suffix not in _JSON_SUFFIXES:
            yield path.read_text(errors="replace")
            continue
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f"{path}:{n}: not a JSON object with a {text_field!r} field "
                        "(upcycle.calibration.text_field)"
                    ) from None
                yield str(text)


def _load_tokenizer(source: Path) -> tuple[Any, str | None]:
    """(tokenizer, None), or (None, why not).

    A tokenizer.json is loaded as it is (`PreTrainedTokenizerFast`): AutoTokenizer would let the
    model's config pick the class, and transformers 5's Qwen2Tokenizer rebuilds its model from
    vocab.json and merges.txt instead of reading tokenizer.json (the same tokens for Qwen's files).
    """
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        return None, f"no tokenizer files in {source}"
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (source / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(source), None
        return AutoTokenizer.from_pretrained(source), None
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        return None, f"the tokenizer in {source} does not load ({type(e).__name__}: {e})"


def calibration_ids(
    source: str | Path, cfg: CalibrationConfig, vocab_size: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration tokens [B, L] (int64) and a description of them for the report.

    Raises:
        ValueError: a path that matches nothing, a malformed JSON line, text too short for two tokens,
            or token ids outside the model's vocabulary.
    """
    b, seq = cfg.num_sequences, cfg.seq_len
    info: dict[str, Any] = {"path": cfg.path}
    files = calibration_files(cfg)
    tokenizer, why = _load_tokenizer(Path(source)) if files else (None, "upcycle.calibration.path is null")
    if tokenizer is None:
        g = torch.Generator().manual_seed(RANDOM_IDS_SEED)
        ids = torch.randint(0, vocab_size, (b, seq), generator=g)
        return ids, info | {"tokens": "random_ids", "reason": why, "num_sequences": b, "seq_len": seq}
    eos = tokenizer.eos_token_id
    need = b * seq
    flat: list[int] = []
    num_docs = 0
    for text in _documents(files, cfg.text_field):
        flat += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            flat.append(eos)
        num_docs += 1
        if len(flat) >= need:
            break
    if len(flat) < 2:
        raise ValueError(f"upcycle.calibration.path={cfg.path!r}: fewer than 2 tokens of text")
    if len(flat) < seq:  # one short sequence
        b, seq = 1, len(flat)
    else:
        b = min(b, len(flat) // seq)
    ids = torch.tensor(flat[: b * seq], dtype=torch.long).view(b, seq)
    if int(ids.max()) >= vocab_size:
        raise ValueError(
            f"the tokenizer in {source} gives id {int(ids.max())}, beyond the model's vocab_size={vocab_size}"
        )
    return ids, info | {"tokens": "text", "documents": num_docs, "num_sequences": b, "seq_len": seq}
