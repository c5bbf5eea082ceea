"""The builtin tokenizer is deterministic, cached, lossless and exportable; any local HF tokenizer loads."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import data.tokenizer as tokenizer_module
from data.corpus import builtin_documents
from data.tokenizer import BUILTIN_VOCAB_SIZE, EOS_TOKEN, check_vocab, fingerprint, load_tokenizer

TEXT = "def f(x):\n    return x ** 2  # naïve — ünïcödé ✓ 中文\n\n"


def test_builtin_has_a_small_vocab_and_an_eos(tokenizer) -> None:
    assert len(tokenizer) == BUILTIN_VOCAB_SIZE
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id is not None
    assert (
        tokenizer(TEXT, add_special_tokens=False)["input_ids"][-1] != tokenizer.eos_token_id
    )  # no EOS added


@pytest.mark.parametrize("text", [TEXT, builtin_documents()[0], " leading and trailing \t"])
def test_byte_level_round_trip_is_lossless(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_builtin_training_is_deterministic(tokenizer, tmp_path) -> None:
    again = load_tokenizer("builtin", tmp_path)  # trained anew in another cache
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert fingerprint(again) == fingerprint(tokenizer)
    # It compresses the corpus like a BPE should: ~3.5 characters per token on English prose.
    doc = builtin_documents()[1]
    assert len(doc) / len(tokenizer(doc)["input_ids"]) > 2.5


def test_builtin_is_read_from_the_cache(cache_dir, tokenizer, monkeypatch) -> None:
    def retrain(*_args, **_kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizer_module, "train_builtin_tokenizer", retrain)
    assert fingerprint(load_tokenizer("builtin", cache_dir)) == fingerprint(tokenizer)


def test_save_pretrained_round_trips_through_auto_tokenizer(tokenizer, tmp_path) -> None:
    tokenizer.save_pretrained(tmp_path / "export")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    assert reloaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    by_path = load_tokenizer(str(tmp_path / "export"))
    assert fingerprint(by_path) == fingerprint(tokenizer)


def test_check_vocab(tokenizer) -> None:
    check_vocab(tokenizer, BUILTIN_VOCAB_SIZE)
    check_vocab(tokenizer, 151_936)
    with pytest.raises(ValueError, match=r"2048 tokens .* model\.vocab_size=2047"):
        check_vocab(tokenizer, BUILTIN_VOCAB_SIZE - 1)


def test_bad_tokenizer_paths(tmp_path, tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer=.*nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*empty.*could not load"):
        load_tokenizer(str(tmp_path / "empty"))
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    no_eos.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(ValueError, match="has no eos_token"):
        load_tokenizer(str(tmp_path / "no_eos"))
