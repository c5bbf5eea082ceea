"""Tokenizers: any fast Hugging Face tokenizer, or a small byte-level BPE trained on the built-in corpus.

Design choices:
- The builtin tokenizer is trained once with `tokenizers` (BPE trainer ties break on the pair, so the
  result is deterministic), saved with `save_pretrained` under a cache key made of the vocabulary size
  and the corpus fingerprint, and from then on loaded like any other local tokenizer.
- The cache entry appears atomically (written to a temporary folder, then renamed), so several ranks
  starting at once on a shared file system never read a half-written tokenizer.
- `fingerprint()` hashes only what maps text to ids (normaliser, pre-tokeniser, model, added tokens),
  so prepared shards can be checked against the tokenizer used to read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.config import BUILTIN
from data.corpus import builtin_documents, corpus_fingerprint

BUILTIN_VOCAB_SIZE = 2048
"""Tokens in the builtin tokenizer, EOS included."""
EOS_TOKEN = "<|endoftext|>"
"""The builtin tokenizer's end-of-document token (Qwen's spelling)."""
_BUILTIN_VERSION = 1  # bump when the training recipe changes, to invalidate caches


def load_tokenizer(
    name_or_path: str, cache_dir: str | os.PathLike[str] = "~/.cache/finemoe"
) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer that has an EOS token.

    Args:
        name_or_path: "builtin", a local tokenizer directory, or a Hub name (where the network allows).
        cache_dir: where the builtin tokenizer is trained into once and read from afterwards.

    Returns:
        The tokenizer; `save_pretrained` writes files that `AutoTokenizer` reads back.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: files that are not a fast tokenizer, or a tokenizer without an EOS token.
    """
    if name_or_path == BUILTIN:
        path = str(builtin_tokenizer_dir(cache_dir))
    else:
        path = os.path.expanduser(name_or_path)
        if not os.path.exists(path) and _looks_local(name_or_path):
            raise FileNotFoundError(f"data.tokenizer={name_or_path!r}: no such file or directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.tokenizer={name_or_path!r}: could not load a tokenizer: {e}") from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"data.tokenizer={name_or_path!r} loads as {type(tokenizer).__name__}, not a fast "
            "(tokenizers-backed) tokenizer; provide a tokenizer.json"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"data.tokenizer={name_or_path!r} has no eos_token; set one in its tokenizer_config.json, "
            "documents are joined with it"
        )
    return tokenizer


def check_vocab(tokenizer: PreTrainedTokenizerFast, model_vocab_size: int) -> None:
    """Raise ValueError if the tokenizer can emit ids the model has no embedding row for.

    Args:
        tokenizer: the data's tokenizer (added and special tokens count).
        model_vocab_size: embedding rows of the model (`model.vocab_size`).
    """
    size = len(tokenizer)
    if size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has {size} tokens (special tokens included) but "
            f"model.vocab_size={model_vocab_size}: ids >= {model_vocab_size} have no embedding row"
        )


def fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of what maps text to token ids (not padding, truncation or decoding settings)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    keys = ("normalizer", "pre_tokenizer", "model", "added_tokens")
    blob = json.dumps({k: spec.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def builtin_tokenizer_dir(cache_dir: str | os.PathLike[str], vocab_size: int = BUILTIN_VOCAB_SIZE) -> Path:
    """The builtin tokenizer's directory under `cache_dir`, trained and saved there if absent."""
    key = f"tokenizer-builtin-v{_BUILTIN_VERSION}-bpe{vocab_size}-{corpus_fingerprint()[:16]}"
    target = Path(cache_dir).expanduser() / key
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        train_builtin_tokenizer(vocab_size).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_builtin_tokenizer(vocab_size: int = BUILTIN_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus (deterministic; ~0.2 s).

    Args:
        vocab_size: tokens in the result, including the 256 byte tokens and EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"builtin tokenizer vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(builtin_documents(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def _looks_local(name: str) -> bool:
    """True for names that cannot be a Hub repository id (`name` or `owner/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
