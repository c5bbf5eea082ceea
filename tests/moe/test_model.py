"""Whole-model behaviour: activation checkpointing, meta construction, packed-document masking."""

import torch

from moe.config import ModelConfig
from moe.model import Qwen2MoEForCausalLM


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(expert_backend="torch", router_z_loss_coef=1e-3, **kw)
    m = Qwen2MoEForCausalLM(cfg)
    m.init_weights(torch.Generator().manual_seed(seed))
    return m


def test_activation_checkpointing_gives_identical_gradients():
    ids = torch.randint(0, 256, (2, 12))
    grads = []
    for ckpt in (False, True):
        m = _model()
        m.train()
        m.gradient_checkpointing = ckpt
        out = m(ids, targets=ids.roll(-1, 1))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0)


def test_meta_construction_then_init_is_seeded():
    cfg = ModelConfig(expert_backend="torch")
    with torch.device("meta"):
        a = Qwen2MoEForCausalLM(cfg)
    a.to_empty(device="cpu")
    a.tie_weights()
    a.init_weights(torch.Generator().manual_seed(3))
    b = _model(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_document_mask_equals_separate_sequences():
    """Two packed documents with reset positions and document ids == each document on its own."""
    m = _model(num_experts=0).eval()
    d1, d2 = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    packed = torch.cat([d1, d2], 1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    doc = torch.cat([torch.zeros(5), torch.ones(7)]).long()[None]
    with torch.no_grad():
        got = m(packed, position_ids=pos, document_ids=doc).logits
        want = torch.cat([m(d1).logits, m(d2).logits], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage():
    m = _model(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.num_params() == m.config.num_params()["total"]
