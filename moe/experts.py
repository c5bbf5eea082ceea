"""Routed experts: 3-D SwiGLU weights and the backends that compute them.

Shape legend: T tokens, H hidden, I expert width, E experts held by this rank, K experts per token,
S dispatched rows (grouped by expert).

Design choices:
- Weights are transformers 5.x's in-memory layout: `gate_up_proj [E, 2I, H]` (rows [:I] gate, [I:]
  up) and `down_proj [E, H, I]`. Both grouped GEMMs read them transposed (views, no copies), and gate
  and up are one fused GEMM.
- A backend is a pair of (permute/unpermute, grouped SwiGLU) implementations; `RoutedExperts.forward`
  shows the whole data flow, and the kernel choice sits behind `self.ops`.
- megablocks and grouped_gemm are imported lazily, only when the megablocks backend is selected.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from moe import dispatch
from moe.config import ExpertBackend

if TYPE_CHECKING:
    from moe.dispatch import ExpertParallel

MEGABLOCKS_INSTALL_HINT = (
    "install the kernels with `bash launch/install_kernels.sh` (builds grouped_gemm and megablocks for the "
    "local CUDA and installs them with --no-deps, leaving torch alone)"
)


@functools.cache
def megablocks_available() -> bool:
    """CUDA present and megablocks' compiled ops and grouped_gemm really import (not just installed)."""
    if not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("megablocks") is None or importlib.util.find_spec("grouped_gemm") is None:
        return False
    try:
        import grouped_gemm.ops  # noqa: F401
        import megablocks.ops  # noqa: F401
    except Exception:  # built against another torch, missing megablocks_ops / stk / triton, ...
        return False
    return True


def check_grouped_mm_alignment(hidden_size: int, moe_intermediate_size: int, dtype: torch.dtype) -> None:
    """Refuse expert widths that grouped GEMMs cannot address, naming the rule.

    `torch.nn.functional.grouped_mm` (CPU and CUDA) and grouped_gemm need every row stride to be a
    multiple of 16 bytes: `hidden_size` and `moe_intermediate_size` multiples of 4 in fp32 and of 8 in
    bf16. Without this check the run dies deep in the first forward with "strides should be multiple
    of 16 bytes".
    """
    elem = torch.empty((), dtype=dtype).element_size()
    multiple = 16 // elem
    for name, value in (("hidden_size", hidden_size), ("moe_intermediate_size", moe_intermediate_size)):
        if value % multiple:
            raise ValueError(
                f"model.{name}={value} must be a multiple of {multiple} for {str(dtype).removeprefix('torch.')} "
                f"routed experts: grouped GEMMs need 16-byte-aligned rows ({multiple} x {elem}-byte elements)"
            )


def resolve_backend(backend: ExpertBackend | str, dtype: torch.dtype = torch.bfloat16) -> ExpertBackend:
    """`auto` -> megablocks on CUDA when installed and the experts are bf16 (grouped_gemm is bf16-only),
    else torch. Raises ValueError if an explicit choice is unavailable."""
    try:
        backend = ExpertBackend(backend)
    except ValueError:
        choices = ", ".join(b.value for b in ExpertBackend)
        raise ValueError(f"model.expert_backend={backend!r} is unknown; choose one of {choices}") from None
    if backend is ExpertBackend.auto:
        use_megablocks = dtype == torch.bfloat16 and megablocks_available()
        return ExpertBackend.megablocks if use_megablocks else ExpertBackend.torch
    if backend is ExpertBackend.megablocks:
        if not torch.cuda.is_available():
            raise ValueError("model.expert_backend=megablocks needs CUDA; use expert_backend=torch on CPU")
        if not megablocks_available():
            raise ValueError(
                f"model.expert_backend=megablocks: megablocks/grouped_gemm not installed; {MEGABLOCKS_INSTALL_HINT}"
            )
    return backend


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    `F.grouped_mm`'s backward rejects expanded gradients (e.g. from `.sum()`), see reference.md 6.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_mm(x_SA: torch.Tensor, w_EAB: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(F.grouped_mm(x_SA, w_EAB, offs=offs_E))


def _no_rows(x_SH: torch.Tensor, gate_up_EIH: torch.Tensor, down_EHI: torch.Tensor) -> torch.Tensor:
    """The [0, H] output for zero received rows (e.g. an expert-parallel rank that got no token).

    It must still be a function of the received rows: autograd then reaches the dispatch all-to-all's
    backward on this rank too, which every other EP rank is waiting in, and which returns this rank's
    own tokens' input gradients from the ranks that computed them. The weights get a zero gradient.
    """
    return x_SH * 0 + (gate_up_EIH.sum() + down_EHI.sum()) * 0


class TorchOps:
    """Sort-based dispatch + `torch.nn.functional.grouped_mm`; the exact CPU reference."""

    permute = staticmethod(dispatch.permute)
    unpermute = staticmethod(dispatch.unpermute)

    @staticmethod
    def grouped_swiglu(x_SH, counts_E, gate_up_EIH, down_EHI):
        if x_SH.shape[0] == 0:
            return _no_rows(x_SH, gate_up_EIH, down_EHI)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        gate_up_S2I = _grouped_mm(x_SH, gate_up_EIH.transpose(1, 2), offs_E)
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        return _grouped_mm(F.silu(gate_SI) * up_SI, down_EHI.transpose(1, 2), offs_E)


class MegablocksOps:
    """megablocks' dropless permutation kernels + grouped_gemm (CUDA, bf16)."""

    def __init__(self, num_experts: int):
        from megablocks import ops as mb_ops  # lazy: CUDA-only package

        self.mb = mb_ops
        self.num_experts = num_experts
        self.end_bit = max(int(num_experts - 1).bit_length(), 1)

    def permute(self, x_TH, experts_TK, num_experts):
        top_k = experts_TK.shape[1]
        x_TH = x_TH.contiguous()  # the triton gather kernel addresses rows as index * num_columns
        flat_S = experts_TK.reshape(-1).int()
        bin_ids, indices = self.mb.sort(flat_S, self.end_bit)
        counts_E = self.mb.histogram(flat_S, num_experts)
        bins = self.mb.inclusive_cumsum(counts_E, 0).view(-1)
        x_SH = self.mb.gather(x_TH, indices, bin_ids, bins, top_k)
        return x_SH, _MegablocksPlan(indices, bin_ids, bins, counts_E.long(), x_TH.shape[0], top_k)

    def unpermute(self, y_SH, weights_TK, plan):
        w_S = weights_TK.reshape(-1).to(y_SH.dtype)
        return self.mb.scatter(y_SH, plan.indices, plan.bin_ids, w_S, plan.bins, plan.top_k)

    @staticmethod
    def grouped_swiglu(x_SH, counts_E, gate_up_EIH, down_EHI):
        from grouped_gemm.ops import gmm

        if gate_up_EIH.dtype != torch.bfloat16:
            raise ValueError(
                f"model.expert_backend=megablocks needs bf16 weights (grouped_gemm is bf16-only), got "
                f"{gate_up_EIH.dtype}; use expert_backend=torch for other dtypes"
            )
        if x_SH.shape[0] == 0:
            return _no_rows(x_SH, gate_up_EIH, down_EHI)
        batch_sizes = counts_E.cpu()  # grouped_gemm wants int64 sizes on the host
        gate_up_S2I = gmm(x_SH, gate_up_EIH, batch_sizes, trans_b=True)
        gate_SI, up_SI = gate_up_S2I.chunk(2, dim=-1)
        return gmm(F.silu(gate_SI) * up_SI, down_EHI, batch_sizes, trans_b=True)


class _MegablocksPlan:
    def __init__(self, indices, bin_ids, bins, counts_E, num_tokens, top_k):
        self.indices, self.bin_ids, self.bins = indices, bin_ids, bins
        self.counts_E, self.num_tokens, self.top_k = counts_E, num_tokens, top_k


class RoutedExperts(nn.Module):
    """E fine-grained SwiGLU experts computed dropless by the selected backend."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, backend: ExpertBackend | str
    ):
        super().__init__()
        self.num_experts = num_experts  # global count; this module may hold a slice (expert parallel)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.backend = backend
        self.expert_parallel: ExpertParallel | None = None
        self._ops: Any = None
        self._ops_dtype: torch.dtype | None = None

    @property
    def ops(self) -> Any:
        """The backend's kernels, resolved at the first forward for the weights' dtype (and again if the
        dtype changes, e.g. when DeepSpeed casts the model to bf16)."""
        dtype = self.gate_up_proj.dtype
        if self._ops is None or self._ops_dtype != dtype:
            check_grouped_mm_alignment(self.gate_up_proj.shape[2], self.down_proj.shape[2], dtype)
            resolved = resolve_backend(self.backend, dtype)
            self._ops = (
                MegablocksOps(self.num_experts) if resolved is ExpertBackend.megablocks else TorchOps()
            )
            self._ops_dtype = dtype
        return self._ops

    def forward(self, x_TH: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        x_SH, plan = self.ops.permute(x_TH, experts_TK, self.num_experts)
        counts_E = plan.counts_E
        if self.expert_parallel is not None:
            x_SH, counts_E, ep_ctx = self.expert_parallel.dispatch(x_SH, counts_E)
        y_SH = self.ops.grouped_swiglu(x_SH, counts_E, self.gate_up_proj, self.down_proj)
        if self.expert_parallel is not None:
            y_SH = self.expert_parallel.combine(y_SH, ep_ctx)
        return self.ops.unpermute(y_SH, weights_TK, plan)
