"""megablocks backend == torch backend == fp32 loop reference, RoutedExperts alone (CUDA + megablocks only).

Skipped with the reason where CUDA or the kernels are missing, failed instead under FINEMOE_REQUIRE_GPU=1
(tests/gpu_guard.py).
"""

import pytest
import torch

from moe.experts import RoutedExperts
from tests.moe.reference import loop_experts

pytestmark = [pytest.mark.gpu, pytest.mark.megablocks]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize(
    ("tokens", "experts", "hidden", "inter", "top_k"), [(256, 8, 128, 64, 2), (4096, 60, 2048, 1408, 4)]
)
def test_megablocks_matches_torch_and_reference(tokens, experts, hidden, inter, top_k):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    grads, outs = {}, {}
    x0 = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(tokens, experts, device=dev)
    weights_TK, experts_TK = logits.softmax(-1).topk(top_k, -1)
    gy = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    base = RoutedExperts(experts, hidden, inter, "torch").to(dev, torch.bfloat16)
    torch.nn.init.normal_(base.gate_up_proj, 0, 0.02)
    torch.nn.init.normal_(base.down_proj, 0, 0.02)
    for backend in ("torch", "megablocks", "loop"):
        # the loop reference runs in fp32 on the same (bf16-representable) values
        dtype = torch.float32 if backend == "loop" else torch.bfloat16
        x = x0.to(dtype, copy=True).requires_grad_()
        ex = RoutedExperts(experts, hidden, inter, "torch" if backend == "loop" else backend).to(dev, dtype)
        ex.load_state_dict(base.state_dict())
        if backend == "loop":
            y = loop_experts(x, experts_TK, weights_TK, ex.gate_up_proj, ex.down_proj)
        else:
            y = ex(x, experts_TK, weights_TK)
        y.backward(gy.to(dtype))
        outs[backend] = y
        grads[backend] = (x.grad, ex.gate_up_proj.grad, ex.down_proj.grad)
    for backend in ("torch", "megablocks"):
        assert _rel(outs[backend], outs["loop"]) <= 1e-2
        for g, ref in zip(grads[backend], grads["loop"]):
            assert _rel(g, ref) <= 1e-2
    assert _rel(outs["megablocks"], outs["torch"]) <= 1e-2
