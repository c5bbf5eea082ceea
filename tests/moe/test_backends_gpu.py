"""Expert backends on CUDA, whole MoEBlock and whole model, against fp32 references (CUDA only).

`gpu` / `megablocks` marks: skipped with the reason where CUDA or the kernels are missing, failed instead
under FINEMOE_REQUIRE_GPU=1 (tests/gpu_guard.py).

Every backend runs in bf16 (grouped_gemm is bf16-only) on bf16-representable weights; the references
are fp32 computations on the same weights, with routed experts computed one at a time by
`tests.moe.reference.loop_experts`. The router is fp32 in both, so routing decisions are identical in
the block tests. Tolerance: relative Frobenius error <= 1e-2 (bf16 rounding of the intermediates gives
about 5e-3 at these shapes).
"""

import pytest
import torch

from moe.config import ModelConfig
from moe.layer import MoEBlock
from moe.model import Qwen2MoEForCausalLM
from tests.moe.reference import loop_experts

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
TOL = 1e-2
NEEDS_MEGABLOCKS = pytest.mark.megablocks
BACKENDS = ["torch", pytest.param("megablocks", marks=NEEDS_MEGABLOCKS)]
SHAPES = {
    "tiny": dict(
        tokens=256,
        hidden_size=128,
        num_experts=8,
        moe_intermediate_size=64,
        num_experts_per_tok=2,
        shared=128,
    ),
    "a27b": dict(
        tokens=4096,
        hidden_size=2048,
        num_experts=60,
        moe_intermediate_size=1408,
        num_experts_per_tok=4,
        shared=5632,
    ),
}
TINY_MODEL = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=128,
)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _config(shape: str, shared: bool, backend: str) -> ModelConfig:
    s = {k: v for k, v in SHAPES[shape].items() if k != "tokens"}
    width = s.pop("shared")
    return ModelConfig(**s, shared_expert_intermediate_size=width if shared else 0, expert_backend=backend)


def _block_and_reference(shape: str, shared: bool, backend: str, seed: int = 0):
    """A bf16 block with the given backend and an fp32 copy whose routed experts are the loop reference."""
    cfg = _config(shape, shared, backend)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    with DEVICE:
        block = MoEBlock(cfg)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02, generator=gen)
        block.to(torch.bfloat16)
        ref = MoEBlock(_config(shape, shared, "torch")).float()
    ref.load_state_dict(block.state_dict())  # upcast: the same values in fp32
    ex = ref.experts
    ex.forward = lambda x, e, w: loop_experts(x, e, w, ex.gate_up_proj, ex.down_proj)
    return block, ref


def _inputs(shape: str, seed: int = 1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    size = (1, SHAPES[shape]["tokens"], SHAPES[shape]["hidden_size"])
    x = torch.randn(size, device=DEVICE, generator=gen).to(torch.bfloat16)
    return x, torch.randn(size, device=DEVICE, generator=gen).to(torch.bfloat16)


def _run(block, x, gy):
    """Output, input gradient and parameter gradients of one forward + backward."""
    x = x.clone().requires_grad_()
    y, router = block(x)
    y.backward(gy)
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}, router


def _assert_close(got, want, what):
    errs = {"output": _rel(got[0], want[0]), "grad input": _rel(got[1], want[1])}
    errs.update({f"grad {n}": _rel(g, want[2][n]) for n, g in got[2].items()})
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{what}: relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("shape", ["tiny", "a27b"])
def test_moe_block_matches_fp32_loop_reference(shape, shared, backend):
    block, ref = _block_and_reference(shape, shared, backend)
    x, gy = _inputs(shape)
    got = _run(block, x, gy)
    want = _run(ref, x.float(), gy.float())
    assert torch.equal(got[3].experts_TK, want[3].experts_TK)  # same routing: the comparison is exact-route
    _assert_close(got, want, f"{backend} vs fp32 loop")


@NEEDS_MEGABLOCKS
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("shape", ["tiny", "a27b"])
def test_megablocks_backend_equals_torch_backend(shape, shared):
    mb, _ = _block_and_reference(shape, shared, "megablocks")
    pt, _ = _block_and_reference(shape, shared, "torch")
    x, gy = _inputs(shape)
    _assert_close(_run(mb, x, gy), _run(pt, x, gy), "megablocks vs torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_tokens_get_exactly_zero_gradient(backend):
    """Empty groups in the middle and at the end of the grouped GEMMs (odd experts never chosen)."""
    block, ref = _block_and_reference("tiny", False, backend)
    for b in (block, ref):
        b.gate.use_selection_bias = True
        b.gate.selection_bias[1::2] = -1e4  # selection only; the combine weights stay the probabilities
    x, gy = _inputs("tiny")
    got = _run(block, x, gy)
    assert set(got[3].experts_TK.unique().tolist()) <= set(range(0, block.experts.num_experts, 2))
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        assert torch.all(got[2][name][1::2] == 0), f"{name}: experts without tokens got a gradient"
        assert got[2][name][0::2].abs().sum() > 0
    _assert_close(got, _run(ref, x.float(), gy.float()), f"{backend} vs fp32 loop, empty experts")


def _tiny_model_reference():
    """The fp32 model on CPU (bf16-representable weights), a batch, and its output."""
    torch.manual_seed(0)
    ref = Qwen2MoEForCausalLM(ModelConfig(expert_backend="torch", **TINY_MODEL))
    ref.init_weights(torch.Generator().manual_seed(0))
    ref.to(torch.bfloat16).float()  # bf16-representable weights
    ids = torch.randint(0, TINY_MODEL["vocab_size"], (2, 65), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids[:, :-1], targets=ids[:, 1:])
    return ref, ids, want


def _tiny_model_on_cuda(ref, ids, backend):
    """Whole model in bf16 on CUDA with `backend`, same state dict: (logits on CPU, loss)."""
    model = Qwen2MoEForCausalLM(ModelConfig(expert_backend=backend, **TINY_MODEL))
    model.load_state_dict(ref.state_dict())
    model.to(DEVICE, torch.bfloat16)
    out = model(ids[:, :-1].to(DEVICE), targets=ids[:, 1:].to(DEVICE))
    out.loss.backward()  # the backward runs through every backend too
    return out.logits.float().cpu(), out.loss.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_model_logits_match_fp32_model(backend):
    """Whole model in bf16 on CUDA, each backend, against the fp32 model on CPU (same state dict)."""
    ref, ids, want = _tiny_model_reference()
    logits, loss = _tiny_model_on_cuda(ref, ids, backend)
    assert _rel(logits, want.logits) <= TOL, backend
    assert abs(loss - want.loss.item()) <= TOL * want.loss.item(), backend


@NEEDS_MEGABLOCKS
def test_tiny_model_logits_equal_across_backends():
    ref, ids, _ = _tiny_model_reference()
    mb, _ = _tiny_model_on_cuda(ref, ids, "megablocks")
    pt, _ = _tiny_model_on_cuda(ref, ids, "torch")
    assert _rel(mb, pt) <= TOL


def _loss_grads_peak(model, ids, chunk: int) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and the peak CUDA memory above the start of one forward and backward."""
    model.loss_chunk_tokens = chunk
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    return out.loss.item(), grads, peak


def test_chunked_loss_on_cuda_equals_the_whole_loss_and_needs_a_fraction_of_the_memory():
    """bf16 on CUDA, vocabulary 32768, 4 x 1024 tokens: `loss_chunk_tokens=512` gives the loss and the
    gradients of the whole-batch loss (bf16 GEMMs over row slices may round differently) and peaks at
    under a third of its memory (the [T, V] logits, fp32 copy and log-softmax: ~10 V bytes per token)."""
    cfg = ModelConfig(expert_backend="torch", **(TINY_MODEL | {"vocab_size": 32768}))
    torch.manual_seed(0)
    model = Qwen2MoEForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(DEVICE, torch.bfloat16).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 1025), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    loss, grads, peak = _loss_grads_peak(model, ids, 0)
    chunked_loss, chunked_grads, chunked_peak = _loss_grads_peak(model, ids, 512)
    assert abs(chunked_loss - loss) <= 1e-3 * loss
    for name, g in grads.items():
        assert _rel(chunked_grads[name], g) <= TOL, name
    assert chunked_peak < peak / 3, (chunked_peak, peak)
