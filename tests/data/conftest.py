"""Session fixtures: a cache directory and the builtin tokenizer, trained into it once."""

from __future__ import annotations

import pytest

from data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tokenizer(cache_dir: str):
    return load_tokenizer("builtin", cache_dir)
