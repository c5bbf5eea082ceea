"""Whole-model behaviour: activation checkpointing, meta construction, packed-document masking."""

import pytest
import torch

from moe.config import ModelConfig
from moe.model import IGNORE_INDEX, Qwen2MoEForCausalLM


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


def _loss_and_grads(m, ids, targets):
    out = m(ids, targets=targets)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_the_float64_loss_and_gradients(tie):
    """`loss_chunk_tokens` (3, 7: a chunk straddles the two sequences; 24 = one chunk; 100 > T) gives the
    loss and every gradient of the float64 model without chunking (ignored targets included), and
    returns no logits. Dense, since the grouped GEMM of the routed experts has no float64; the MoE
    model is compared with itself unchunked."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    targets[0, :4] = IGNORE_INDEX
    targets[1, -1] = IGNORE_INDEX
    for experts, ref_dtype in ((0, torch.float64), (4, torch.float32)):
        ref = _model(tie_word_embeddings=tie, num_experts=experts).to(ref_dtype).train()
        want, want_grads = _loss_and_grads(ref, ids, targets)
        for chunk in (3, 7, 24, 100):
            m = _model(tie_word_embeddings=tie, num_experts=experts).train()
            m.loss_chunk_tokens = chunk
            got, grads = _loss_and_grads(m, ids, targets)
            assert got.logits is None
            torch.testing.assert_close(got.ce_loss.to(ref_dtype), want.ce_loss, rtol=1e-6, atol=0)
            torch.testing.assert_close(got.loss.to(ref_dtype), want.loss, rtol=1e-6, atol=0)
            for n, g in want_grads.items():
                scale = float(g.abs().max())
                msg = f"experts={experts} chunk={chunk} {n}"
                torch.testing.assert_close(grads[n].to(ref_dtype), g, rtol=0, atol=1e-5 * scale, msg=msg)


def test_chunked_loss_saves_no_vocabulary_wide_tensor():
    """Without chunks autograd keeps the [T, V] logits and their fp32 log-softmax; with chunks it keeps
    no tensor with a vocabulary-sized dimension (weights aside): each chunk is recomputed in backward.
    Vocabulary 1000 is no other dimension of this model."""
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))

    def vocab_wide_saved(chunk: int) -> int:
        m = _model(vocab_size=1000).train()
        m.loss_chunk_tokens = chunk
        weights = {p.data_ptr() for p in m.parameters()}
        wide = []

        def pack(t):
            if t.data_ptr() not in weights and 1000 in t.shape:
                wide.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m(ids, targets=ids.roll(-1, 1))
        out.loss.backward()  # the recomputed chunks work in backward
        return sum(wide)

    assert vocab_wide_saved(0) >= 2 * 32 * 1000
    assert vocab_wide_saved(8) == 0


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_in_bf16_sums_the_head_gradient_in_fp32(tie):
    """bf16 model, 64 chunks of 16 tokens: the LM head's gradient is as close to the float64 model's as
    the whole loss's is (summing 64 bf16 chunk gradients in bf16 made it 2-3x worse), and so is every
    other gradient."""
    ids = torch.randint(0, 2048, (2, 513), generator=torch.Generator().manual_seed(3))
    kw = dict(num_experts=0, vocab_size=2048, hidden_size=64, intermediate_size=128, tie_word_embeddings=tie)
    model = _model(**kw).to(torch.bfloat16).train()
    ref = _model(**kw).double().train()
    ref.load_state_dict(model.state_dict())  # the bf16 values, exactly
    _, want = _loss_and_grads(ref, ids[:, :-1], ids[:, 1:])
    errors = {}
    for chunk in (0, 16):
        model.loss_chunk_tokens = chunk
        _, got = _loss_and_grads(model, ids[:, :-1], ids[:, 1:])
        errors[chunk] = {n: float((got[n].double() - w).norm() / w.norm()) for n, w in want.items()}
    for name, whole in errors[0].items():
        assert errors[16][name] <= 1.5 * whole + 1e-4, (name, errors[16][name], whole)


def test_chunked_loss_with_every_target_ignored_is_nan_with_zero_gradients_as_the_whole_loss():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    targets = torch.full_like(ids, IGNORE_INDEX)
    results = []
    for chunk in (0, 5):
        m = _model(num_experts=0).train()
        m.loss_chunk_tokens = chunk
        out, grads = _loss_and_grads(m, ids, targets)
        results.append((out.ce_loss, grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert whole.isnan() and chunked.isnan()
    for name, g in whole_grads.items():
        assert torch.equal(chunked_grads[name], g), name  # zeros (no NaN from 0 * inf)
