"""PlannedShardWriter: streamed shards that safetensors and transformers read like any other."""

import json

import pytest
import torch

from moe.hf import CheckpointReader
from upcycle.writer import PlannedShardWriter

SHAPES = {"a": (4, 8), "b": (0, 8), "c": (16,), "d": (8, 8), "e": (3,)}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_over_several_shards(dtype, tmp_path):
    want = _tensors()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    # 48 elements a shard: {a, b, c} (32 + 0 + 16), {d} (64, alone as it is larger), {e}
    with PlannedShardWriter(tmp_path / "ckpt", SHAPES, dtype, max_shard_bytes=48 * itemsize) as w:
        for key in ("d", "a", "e", "c", "b"):  # any order: each tensor has its planned place
            w.add(key, want[key])
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert (
        index["metadata"]["total_size"]
        == sum(t.numel() for t in want.values()) * want["a"].to(dtype).element_size()
    )
    reader = CheckpointReader(tmp_path / "ckpt")
    for key, t in want.items():
        assert torch.equal(reader.get(key, SHAPES[key]), t.to(dtype)), key


def test_refuses_unplanned_or_wrong_tensors(tmp_path):
    with PlannedShardWriter(tmp_path / "ckpt", SHAPES, torch.float32, max_shard_bytes=1 << 20) as w:
        with pytest.raises(ValueError, match="not in the planned checkpoint"):
            w.add("z", torch.zeros(1))
        with pytest.raises(ValueError, match=r"has shape \[4, 4\], planned \[4, 8\]"):
            w.add("a", torch.zeros(4, 4))
        for key, t in _tensors().items():
            w.add(key, t)
        with pytest.raises(ValueError, match="written twice"):
            w.add("a", torch.zeros(4, 8))


def test_incomplete_checkpoint_is_not_published(tmp_path):
    writer = PlannedShardWriter(tmp_path / "ckpt", SHAPES, torch.float32, max_shard_bytes=1 << 20)
    with (
        pytest.raises(ValueError, match="checkpoint incomplete: 1 planned tensors never written"),
        writer as w,
    ):
        for key, t in _tensors().items():
            if key != "c":
                w.add(key, t)
    assert list(tmp_path.iterdir()) == []
