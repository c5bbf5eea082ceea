"""One MoE layer, forward + backward: transformers' Qwen2-MoE block, stock megablocks dMoE, finemoe's MoEBlock.

    python benchmarks/moe_layer.py --out runs/moe_layer --profile   # GPU: the shapes below, bf16
    python benchmarks/moe_layer.py --tiny                           # rehearsal (automatic without CUDA)

Shapes (T tokens, H hidden, E experts of width I, top-K, shared expert width Is):
- Qwen1.5-MoE-A2.7B: T 16384, H 2048, E 60 x I 1408, top-4; routed only, and with the Is 5632 shared expert.
- Mixtral-style, same activated FLOPs: 8 experts of 2816, top-2. 2 x 2816 = 4 x 1408 = 5632, so every token
  costs the same routed matmul FLOPs as in A2.7B, with Mixtral's coarse routing (8 experts, top-2) and 3.5x
  fewer, 2x wider GEMMs per token. (8 x 5632 top-1 would match the FLOPs too but change top-k and halve the
  permutation traffic, mixing two effects.)

Implementations:
- `hf eager` / `hf grouped_mm`: `Qwen2MoeSparseMoeBlock` with `config._experts_implementation` set to the
  per-expert loop or to transformers' sort + grouped_mm path (timed only when aten::_grouped_mm really runs).
  Routed-only rows call its `gate` and `experts`; shared rows call the whole block.
- `megablocks dMoE`: stock `dMoE(mlp_impl="grouped")` (bf16 softmax router, its own permutation kernels,
  grouped_gemm). Input [seq, batch, hidden]. Routed only: it has no sigmoid-gated shared expert.
- `finemoe torch` / `finemoe megablocks`: `moe.layer.MoEBlock` with each expert backend (fp32 router).

Method: the same bf16 weights are copied into every implementation. Before timing, each one's output and
gradients (input, router, experts, shared expert) are compared with an fp32 computation on the same weights
(relative Frobenius error <= 1e-2). The check fixes the routing (every router computes its probabilities
in fp32 from its own weight and keeps the reference's top-k experts), because bf16 and fp32 routers pick
different experts for near-tied tokens. Timing uses each implementation's own router: per iteration, fresh
random inputs and output gradients, gradients reset, CUDA events around forward + backward; median of
`--iters` after `--warmup`. Expert-matmul FLOPs = 3 matmuls x 2 x T x K x H x I x 3 (forward + backward),
plus 3 x 2 x T x H x Is x 3 in rows with the shared expert.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ExpertBackend, ModelConfig
from moe.experts import megablocks_available, resolve_backend
from moe.layer import MoEBlock
from moe.router import RouterOutput

TOLERANCE = 1e-2


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    experts: int
    width: int
    top_k: int
    tokens: int
    batch: int
    """Sequences the tokens are split into (layout only)."""
    shared: int = 0
    """Shared-expert width for the rows that include it; 0: routed rows only."""

    @property
    def seq(self) -> int:
        return self.tokens // self.batch

    def flops(self, shared: int) -> float:
        """Expert-matmul FLOPs of forward + backward."""
        return 18.0 * self.tokens * self.hidden * (self.top_k * self.width + shared)


GPU_SHAPES = [
    Shape("A2.7B", hidden=2048, experts=60, width=1408, top_k=4, tokens=16384, batch=4, shared=5632),
    Shape("Mixtral-style 8x2816 top-2", hidden=2048, experts=8, width=2816, top_k=2, tokens=16384, batch=4),
]
TINY_SHAPES = [
    Shape("A2.7B tiny", hidden=128, experts=12, width=32, top_k=4, tokens=512, batch=2, shared=128),
    Shape("Mixtral-style tiny", hidden=128, experts=8, width=64, top_k=2, tokens=512, batch=2),
]


# ---- weights and the fp32 reference ------------------------------------------------------------
def make_weights(shape: Shape, shared: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """bf16-representable fp32 weights under transformers' / finemoe's parameter names."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, e, i = shape.hidden, shape.experts, shape.width

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * 0.02).to(torch.bfloat16).float()

    w = {
        "gate.weight": normal(e, h),
        "experts.gate_up_proj": normal(e, 2 * i, h),
        "experts.down_proj": normal(e, h, i),
    }
    if shared:
        w["shared_expert.gate_proj.weight"] = normal(shared, h)
        w["shared_expert.up_proj.weight"] = normal(shared, h)
        w["shared_expert.down_proj.weight"] = normal(h, shared)
        w["shared_expert_gate.weight"] = normal(1, h)
    return w


def fixed_routing(x_TH: torch.Tensor, weight_EH: torch.Tensor, experts_TK: torch.Tensor):
    """fp32 logits, probabilities and the probabilities of the given experts (differentiable)."""
    logits_TE = F.linear(x_TH.reshape(-1, weight_EH.shape[1]).float(), weight_EH.float())
    probs_TE = logits_TE.softmax(-1)
    return logits_TE, probs_TE, probs_TE.gather(-1, experts_TK)


def reference_forward(x_TH: torch.Tensor, w: dict[str, torch.Tensor], experts_TK: torch.Tensor):
    """fp32 y = sum_k p_k E_k(x) + sigmoid(x w_sg) S(x), one expert at a time."""
    _, _, weights_TK = fixed_routing(x_TH, w["gate.weight"], experts_TK)
    gate_up, down = w["experts.gate_up_proj"], w["experts.down_proj"]
    inter = gate_up.shape[1] // 2
    y_TH = torch.zeros_like(x_TH)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(experts_TK == e)
        if tok.numel():
            g_SI, u_SI = (x_TH[tok] @ gate_up[e].T).split(inter, dim=-1)
            out = (F.silu(g_SI) * u_SI) @ down[e].T
            y_TH = y_TH.index_add(0, tok, out * weights_TK[tok, slot, None])
    if "shared_expert_gate.weight" in w:
        s = F.silu(x_TH @ w["shared_expert.gate_proj.weight"].T) * (
            x_TH @ w["shared_expert.up_proj.weight"].T
        )
        s = s @ w["shared_expert.down_proj.weight"].T
        y_TH = y_TH + torch.sigmoid(x_TH @ w["shared_expert_gate.weight"].T) * s
    return y_TH


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward):
    module.forward = forward  # instance attribute shadows the class method
    try:
        yield
    finally:
        del module.forward


# ---- implementations ---------------------------------------------------------------------------
class Impl:
    """One implementation of the layer: build, load canonical weights, run, report canonical grads."""

    name: str
    module: nn.Module

    def __init__(self, shape: Shape, shared: int):
        self.shape, self.shared = shape, shared

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, nn.Parameter]:
        """Canonical name -> parameter (a view conversion happens in load / grads where needed)."""
        return dict(self.module.named_parameters())

    @torch.no_grad()
    def load(self, w: dict[str, torch.Tensor]) -> None:
        params = self.params()
        for k, v in w.items():
            params[k].copy_(v)

    def grads(self, names) -> dict[str, torch.Tensor | None]:
        params = self.params()
        return {k: params[k].grad for k in names}

    def fixed_routing(self, experts_TK: torch.Tensor):
        """Context in which the router keeps `experts_TK` (see module docstring)."""
        raise NotImplementedError

    def after_step(self) -> None:
        pass


class FinemoeImpl(Impl):
    def __init__(self, shape, shared, backend: str, device, dtype):
        super().__init__(shape, shared)
        self.name = f"finemoe {backend}"
        cfg = ModelConfig(
            hidden_size=shape.hidden,
            num_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            moe_intermediate_size=shape.width,
            shared_expert_intermediate_size=shared,
            expert_backend=ExpertBackend(backend),
        )
        self.module = MoEBlock(cfg).to(device, dtype)

    def forward(self, x_TH):
        s = self.shape
        return self.module(x_TH.view(s.batch, s.seq, s.hidden))[0].view(s.tokens, s.hidden)

    def fixed_routing(self, experts_TK):
        gate = self.module.gate

        def forward(x_TH):
            logits_TE, probs_TE, weights_TK = fixed_routing(x_TH, gate.weight, experts_TK)
            return RouterOutput(logits_TE, probs_TE, experts_TK, weights_TK)

        return patched_forward(gate, forward)


class _HFRouted(nn.Module):
    """transformers' block without its shared expert: `gate` then `experts`, as the block calls them."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x_BLH):
        x_TH = x_BLH.reshape(-1, x_BLH.shape[-1])
        _, weights_TK, experts_TK = self.block.gate(x_TH)
        return self.block.experts(x_TH, experts_TK, weights_TK).view_as(x_BLH)


class HFImpl(Impl):
    def __init__(self, shape, shared, experts_implementation: str, device, dtype):
        super().__init__(shape, shared)
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        self.name = f"hf {experts_implementation}"
        cfg = Qwen2MoeConfig(
            hidden_size=shape.hidden,
            num_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            moe_intermediate_size=shape.width,
            shared_expert_intermediate_size=shared or 1,  # routed rows never call it
            norm_topk_prob=False,
            hidden_act="silu",
        )
        cfg._experts_implementation = experts_implementation
        self.block = Qwen2MoeSparseMoeBlock(cfg).to(device, dtype)
        self.module = self.block if shared else _HFRouted(self.block)

    def params(self):
        return dict(self.block.named_parameters())

    def forward(self, x_TH):
        s = self.shape
        return self.module(x_TH.view(s.batch, s.seq, s.hidden)).view(s.tokens, s.hidden)

    def fixed_routing(self, experts_TK):
        gate = self.block.gate

        def forward(x_TH):
            logits_TE, _, weights_TK = fixed_routing(x_TH, gate.weight, experts_TK)
            return logits_TE.to(x_TH.dtype), weights_TK.to(x_TH.dtype), experts_TK

        return patched_forward(gate, forward)


class MegablocksImpl(Impl):
    def __init__(self, shape, shared, device, dtype):
        super().__init__(shape, shared)
        assert shared == 0, "stock megablocks has no sigmoid-gated shared expert"
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        self.name = "megablocks dMoE"
        args = Arguments(
            hidden_size=shape.hidden,
            ffn_hidden_size=shape.width,
            moe_num_experts=shape.experts,
            moe_top_k=shape.top_k,
            activation_fn=F.silu,
            mlp_type="glu",
            mlp_impl="grouped",
            bias=False,
            return_bias=False,
            bf16=dtype == torch.bfloat16,
            fp16=False,
            device=device,
        )
        self.module = dMoE(args)

    def forward(self, x_TH):
        s = self.shape
        return self.module(x_TH.view(s.seq, s.batch, s.hidden)).view(s.tokens, s.hidden)

    def _mlp(self):
        return self.module.experts.mlp

    @torch.no_grad()
    def load(self, w):
        e, i, h = self.shape.experts, self.shape.width, self.shape.hidden
        mlp = self._mlp()
        self.module.router.layer.weight.copy_(w["gate.weight"])
        gate_up = w["experts.gate_up_proj"]
        mlp.w1.copy_(gate_up[:, :i].reshape(e * i, h))  # w1[e] = gate_proj [I, H]
        mlp.v1.copy_(gate_up[:, i:].reshape(e * i, h))  # v1[e] = up_proj [I, H]
        mlp.w2.copy_(w["experts.down_proj"].transpose(1, 2).reshape(e * i, h))  # w2[e] = down_proj.T

    def grads(self, names):
        e, i, h = self.shape.experts, self.shape.width, self.shape.hidden
        mlp = self._mlp()
        g = {
            "gate.weight": self.module.router.layer.weight.grad,
            "experts.gate_up_proj": torch.cat([mlp.w1.grad.view(e, i, h), mlp.v1.grad.view(e, i, h)], dim=1),
            "experts.down_proj": mlp.w2.grad.view(e, i, h).transpose(1, 2),
        }
        return {k: g[k] for k in names}

    def fixed_routing(self, experts_TK):
        router = self.module.router

        def forward(x):
            _, probs_TE, weights_TK = fixed_routing(x, router.layer.weight, experts_TK)
            return probs_TE.to(x.dtype), weights_TK.to(x.dtype), experts_TK

        return patched_forward(router, forward)

    def after_step(self):
        from megablocks.layers.moe import clear_load_balancing_loss

        clear_load_balancing_loss()  # stock dMoE appends (counts, scores) to a global list per call


def hf_grouped_mm_dispatches(impl: HFImpl, device, dtype) -> bool:
    """True when transformers' grouped_mm path really runs aten::_grouped_mm (not its loop fallback)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(impl.shape.tokens, impl.shape.hidden, device=device, dtype=dtype)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        impl.forward(x)
    return any("aten::_grouped_mm" in e.key for e in prof.key_averages())


def implementations(shape: Shape, shared: int, device, dtype, only: list[str] | None):
    """(name, factory or None, reason when skipped) for one row group."""
    cuda = device.type == "cuda"
    mb_reason = None
    if not cuda:
        mb_reason = "needs CUDA"
    elif not megablocks_available():
        mb_reason = "megablocks/grouped_gemm not installed"
    rows: list[tuple[str, Any, str | None]] = [
        ("hf eager", lambda: HFImpl(shape, shared, "eager", device, dtype), None),
        ("hf grouped_mm", lambda: HFImpl(shape, shared, "grouped_mm", device, dtype), None),
        (
            "megablocks dMoE",
            lambda: MegablocksImpl(shape, shared, device, dtype),
            "no sigmoid-gated shared expert in stock megablocks" if shared else mb_reason,
        ),
        ("finemoe torch", lambda: FinemoeImpl(shape, shared, "torch", device, dtype), None),
        ("finemoe megablocks", lambda: FinemoeImpl(shape, shared, "megablocks", device, dtype), mb_reason),
    ]
    if only:
        rows = [r for r in rows if any(o in r[0] for o in only)]
    return rows


# ---- check, time, profile ----------------------------------------------------------------------
def check(impl: Impl, w, x_TH, gy_TH, experts_TK, ref) -> dict[str, float]:
    """Relative errors of output and gradients against the fp32 reference, with fixed routing."""
    impl.load(w)
    x = x_TH.clone().requires_grad_()
    for p in impl.module.parameters():
        p.grad = None
    with impl.fixed_routing(experts_TK):
        y = impl.forward(x)
    y.backward(gy_TH)
    impl.after_step()
    ref_y, ref_grads = ref
    errs = {"output": _rel(y, ref_y), "grad input": _rel(x.grad, ref_grads["input"])}
    for k, g in impl.grads(list(w)).items():
        errs[f"grad {k}"] = _rel(g, ref_grads[k]) if g is not None else float("inf")
    return errs


def reference(w, x_TH, gy_TH, experts_TK):
    w32 = {k: v.clone().requires_grad_() for k, v in w.items()}
    x32 = x_TH.float().requires_grad_()
    y = reference_forward(x32, w32, experts_TK)
    y.backward(gy_TH.float())
    grads = {k: v.grad for k, v in w32.items()}
    grads["input"] = x32.grad
    return y.detach(), grads


def time_fwd_bwd(impl: Impl, shape: Shape, iters: int, warmup: int, device, dtype) -> list[float]:
    params = [p for p in impl.module.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    times, events = [], []
    for it in range(warmup + iters):
        x = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype)
        for p in params:
            p.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            impl.forward(x).backward(gy)
            end.record()
            if it >= warmup:
                events.append((start, end))
        else:
            t0 = time.perf_counter()
            impl.forward(x).backward(gy)
            if it >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        impl.after_step()
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    return times


def profile_impl(impl: Impl, shape: Shape, device, dtype, path: Path) -> None:
    """Appends a table of the top operators / kernels of 3 forward + backward passes to `path`."""
    from torch.profiler import ProfilerActivity, profile

    time_fwd_bwd(impl, shape, iters=2, warmup=1, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        time_fwd_bwd(impl, shape, iters=3, warmup=0, device=device, dtype=dtype)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30)
    with path.open("a") as f:
        f.write(
            f"## {impl.name}, {shape.name}: 3 x forward + backward (input randn included), by {sort_by}\n"
        )
        f.write(f"{table}\n\n")
    print(f"profile appended to {path}")


# ---- main --------------------------------------------------------------------------------------
def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_group(shape: Shape, shared: int, args, device, dtype, results: list[dict]) -> None:
    label = f"{shape.name}" + (f" + shared {shared}" if shared else ", routed only")
    print(
        f"\n## {label}: T {shape.tokens}, H {shape.hidden}, {shape.experts} x {shape.width}, top-{shape.top_k}"
    )
    w = make_weights(shape, shared, device, seed=args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    x_TH = torch.randn(shape.tokens, shape.hidden, generator=g, device=device).to(dtype)
    gy_TH = torch.randn(shape.tokens, shape.hidden, generator=g, device=device).to(dtype)
    with torch.no_grad():
        experts_TK = F.linear(x_TH.float(), w["gate.weight"]).topk(shape.top_k, dim=-1).indices
    ref = reference(w, x_TH, gy_TH, experts_TK)
    for name, factory, reason in implementations(shape, shared, device, dtype, args.only):
        row: dict[str, Any] = {"impl": name, "shape": label, "shared": shared, "flops": shape.flops(shared)}
        results.append(row)
        if reason:
            row["skipped"] = reason
            print(f"- {name}: skipped ({reason})")
            continue
        impl = None
        try:
            impl = factory()
            if name == "hf grouped_mm" and not hf_grouped_mm_dispatches(impl, device, dtype):
                row["skipped"] = "transformers did not dispatch to aten::_grouped_mm"
                print(f"- {name}: skipped ({row['skipped']})")
                continue
            errs = check(impl, w, x_TH, gy_TH, experts_TK, ref)
            row["errors"] = errs
            row["max_err"] = max(errs.values())
            row["check_ok"] = row["max_err"] <= TOLERANCE
            if not row["check_ok"]:
                bad = {k: f"{v:.2e}" for k, v in errs.items() if v > TOLERANCE}
                print(f"- {name}: CHECK FAILED (> {TOLERANCE}): {bad}")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = time_fwd_bwd(impl, shape, args.iters, args.warmup, device, dtype)
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["times_ms"] = times
            row["ms"] = statistics.median(times)
            print(f"- {name}: {row['ms']:.3f} ms, max rel err {row['max_err']:.2e}")
            if args.profile and not shared and name in (f"finemoe {args.default_backend}", "megablocks dMoE"):
                profile_impl(impl, shape, device, dtype, args.out / "profiles.txt")
        except Exception as exc:  # one broken implementation must not hide the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"- {name}: ERROR {row['error']}")
        finally:
            del impl
            _free(device)


def table(results: list[dict], peak: float) -> str:
    lines = [
        "| implementation | shape | ms (fwd+bwd) | expert-matmul TFLOP/s | of bound | x stock megablocks "
        "| x hf eager | max rel err vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_group: dict[str, dict[str, float]] = {}
    for r in results:
        if "ms" in r:
            by_group.setdefault(r["shape"], {})[r["impl"]] = r["ms"]
    for r in results:
        if "ms" not in r:
            why = r.get("skipped") or r.get("error", "")
            lines.append(f"| {r['impl']} | {r['shape']} | – | – | – | – | – | {why} |")
            continue
        tflops = r["flops"] / (r["ms"] * 1e-3) / 1e12
        group = by_group[r["shape"]]
        ms = r["ms"]
        vs_mb, vs_hf = (
            f"{group[k] / ms:.2f}" if k in group else "–" for k in ("megablocks dMoE", "hf eager")
        )
        err = f"{r['max_err']:.1e}" + ("" if r["check_ok"] else " FAIL")
        lines.append(
            f"| {r['impl']} | {r['shape']} | {ms:.2f} | {tflops:.3g} | {tflops / peak:.2%} | {vs_mb} | {vs_hf} "
            f"| {err} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without CUDA)")
    p.add_argument(
        "--out", type=Path, default=None, help="directory for moe_layer.md, moe_layer.json, profiles"
    )
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak", type=float, default=790.0, help="bf16 matmul bound, TFLOP/s (H100, measured)")
    p.add_argument(
        "--only", type=lambda s: s.split(","), default=None, help="substrings of implementation names"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profiles.txt: top kernels of finemoe's default backend and stock megablocks",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.iters < 1:
        p.error("--iters must be >= 1")

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("CUDA not available: running the --tiny shapes on CPU (megablocks rows are skipped)")
        args.tiny = True
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    args.default_backend = resolve_backend("auto").value
    args.out = args.out or Path("runs/moe_layer")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profiles.txt").unlink(missing_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32

    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "megablocks": _version("megablocks"),
        "grouped_gemm": _version("grouped_gemm"),
        "finemoe default backend": args.default_backend,
        "iters": args.iters,
        "warmup": args.warmup,
        "peak_tflops": args.peak,
        "command": " ".join(sys.argv),
    }
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))

    results: list[dict] = []
    for shape in TINY_SHAPES if args.tiny else GPU_SHAPES:
        run_group(shape, 0, args, device, dtype, results)
        if shape.shared:
            run_group(shape, shape.shared, args, device, dtype, results)

    md = table(results, args.peak)
    print("\n" + md)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (args.out / "moe_layer.md").write_text(f"{header}\n\n{md}\n")
    payload = {"env": env, "shapes": [asdict(s) for s in (TINY_SHAPES if args.tiny else GPU_SHAPES)]}
    payload["results"] = results
    (args.out / "moe_layer.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwritten: {args.out / 'moe_layer.md'}, {args.out / 'moe_layer.json'}")
    failed = [r["impl"] + " / " + r["shape"] for r in results if r.get("error") or r.get("check_ok") is False]
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
