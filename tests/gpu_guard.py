"""Whether a GPU test runs, skips or fails here: one rule for every GPU test module and for benchmarks/gpu.sh.

    @pytest.mark.gpu          needs CUDA
    @pytest.mark.megablocks   needs CUDA and the megablocks backend (megablocks' compiled ops, grouped_gemm)

`tests/conftest.py` applies `guard()` to every test carrying one of these marks. Without
`FINEMOE_REQUIRE_GPU` a missing requirement skips the test with the reason (CPU CI stays green); with
`FINEMOE_REQUIRE_GPU=1` (set by benchmarks/gpu.sh) it fails the test: on a machine that must run the GPU
tests, a kernel that does not import is a failure, not a silent skip.

    python -m tests.gpu_guard      # prints the decision for both marks; exit 1 where a test would fail
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Mapping

import pytest
import torch

REQUIRE_ENV = "FINEMOE_REQUIRE_GPU"
INSTALL_HINT = "on the GPU machine: bash .gpu/setup-device.sh .gpu; elsewhere: bash launch/install_kernels.sh"


class Outcome(str, enum.Enum):
    run = "run"
    skip = "skip"
    fail = "fail"


def gpu_required(environ: Mapping[str, str] = os.environ) -> bool:
    """`FINEMOE_REQUIRE_GPU` is set to a true value (1, true, yes, on)."""
    return environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def decide(
    *, needs_kernels: bool, required: bool, cuda: bool, kernels_error: str | None
) -> tuple[Outcome, str]:
    """The rule, free of any probing: (outcome, reason).

    Args:
        needs_kernels: the test needs the megablocks backend, not just CUDA.
        required: `FINEMOE_REQUIRE_GPU` is set.
        cuda: `torch.cuda.is_available()`.
        kernels_error: why megablocks/grouped_gemm do not import, or None when they do (not consulted
            without CUDA or when the test does not need them).
    """
    if not cuda:
        missing = "needs CUDA (torch.cuda.is_available() is False)"
    elif needs_kernels and kernels_error is not None:
        missing = f"needs megablocks and grouped_gemm: {kernels_error} ({INSTALL_HINT})"
    else:
        return Outcome.run, ""
    if required:
        return Outcome.fail, f"{REQUIRE_ENV}=1 but this test {missing}"
    return Outcome.skip, missing


def kernels_error() -> str | None:
    """None when the megablocks backend is usable here, else the first import error (CUDA assumed)."""
    from moe.experts import megablocks_available

    if megablocks_available():
        return None
    try:  # megablocks_available() only says no; the import error says why
        import grouped_gemm.ops  # noqa: F401
        import megablocks.ops  # noqa: F401
    except Exception as e:  # not installed, built against another torch, missing stk / triton, ...
        return f"{type(e).__name__}: {e}"
    return "moe.experts.megablocks_available() is False although both import"


def current(needs_kernels: bool) -> tuple[Outcome, str]:
    """`decide()` for this process and machine."""
    cuda = torch.cuda.is_available()
    err = kernels_error() if cuda and needs_kernels else None
    return decide(needs_kernels=needs_kernels, required=gpu_required(), cuda=cuda, kernels_error=err)


def guard(needs_kernels: bool) -> None:
    """Return if the test can run here; otherwise skip it, or fail it under `FINEMOE_REQUIRE_GPU=1`."""
    outcome, reason = current(needs_kernels)
    if outcome is Outcome.fail:
        pytest.fail(reason, pytrace=False)
    if outcome is Outcome.skip:
        pytest.skip(reason)


def guard_item(item: pytest.Item) -> None:
    """`guard()` for a collected test, from its `gpu` / `megablocks` marks (called by conftest.py)."""
    needs_kernels = item.get_closest_marker("megablocks") is not None
    if needs_kernels or item.get_closest_marker("gpu") is not None:
        guard(needs_kernels)


def main() -> int:
    failed = False
    for mark, needs_kernels in (("gpu", False), ("megablocks", True)):
        outcome, reason = current(needs_kernels)
        print(f"@pytest.mark.{mark}: {outcome.value}" + (f" ({reason})" if reason else ""))
        failed |= outcome is Outcome.fail
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
