"""`ShardedWriter`'s memory bound: it holds its pending shard, never the tensors its inputs are views of."""

import torch
from safetensors.torch import load_file

from moe.hf import ShardedWriter


def test_pending_views_do_not_keep_their_base_alive(tmp_path):
    """Per-expert slices of a layer's 3-D experts tensor, written in the same dtype, are copied when
    added, so the storage the writer holds is exactly its pending bytes and the caller's `del` frees
    the whole tensor (before: the views pinned it until the flush, which then cloned every pending
    view at once, about twice the shard)."""
    experts = torch.randn(4, 6, 8)
    with ShardedWriter(tmp_path / "out", max_shard_bytes=1 << 20, dtype=torch.float32) as w:
        for e in range(4):
            w.add(f"expert.{e}", experts[e, :3])
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in w._pending.values()}
        assert sum(held.values()) == w._pending_bytes == 4 * 3 * 8 * 4
    (shard,) = (tmp_path / "out").glob("*.safetensors")
    got = load_file(shard)
    assert all(torch.equal(got[f"expert.{e}"], experts[e, :3]) for e in range(4))
