"""Config validation names the offending field; every preset in configs/data composes and validates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data.config import DataConfig, SourceConfig
from data.prepare import CONFIG_DIR, PrepareConfig

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sources": []}, r"data\.sources must hold"),
        ({"sources": [SourceConfig(path="")]}, r"data\.sources\[0\]\.path"),
        ({"sources": [SourceConfig(), SourceConfig(weight=0.0)]}, r"data\.sources\[1\]\.weight"),
        ({"sources": [SourceConfig(weight=float("nan"))]}, r"data\.sources\[0\]\.weight"),
        ({"sources": [SourceConfig(text_field="")]}, r"data\.sources\[0\]\.text_field"),
        ({"sources": [SourceConfig(txt_sample_by="word")]}, r"data\.sources\[0\]\.txt_sample_by='word'"),  # type: ignore[arg-type]
        ({"seq_len": 0}, r"data\.seq_len"),
        ({"eval_fraction": 1.0}, r"data\.eval_fraction"),
        ({"tokenizer": ""}, r"data\.tokenizer"),
        ({"mixture_window": 1, "sources": [SourceConfig(), SourceConfig()]}, r"data\.mixture_window"),
        ({"prefetch_batches": -1}, r"data\.prefetch_batches"),
        ({"prepared_dir": ""}, r"data\.prepared_dir"),
    ],
)
def test_validate_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**overrides).validate()


def test_prepare_needs_an_output_directory() -> None:
    with pytest.raises(ValueError, match=r"data\.prepared_dir must name"):
        PrepareConfig().validate()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_into_valid_configs(preset: str) -> None:
    assert {"builtin", "local_jsonl", "mixture"} <= set(PRESETS)
    ConfigStore.instance().store(name="data_prepare_schema", node=PrepareConfig)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="data_prepare", overrides=[f"data={preset}", "data.prepared_dir=/tmp/x"])
    job = OmegaConf.to_object(cfg)
    assert isinstance(job, PrepareConfig) and isinstance(job.data.sources[0], SourceConfig)
    job.validate()
    if preset == "builtin":
        assert job.data.sources == [SourceConfig()] and job.data.tokenizer == "builtin"
