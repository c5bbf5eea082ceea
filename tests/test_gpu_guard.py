"""The GPU-test rule (tests/gpu_guard.py) on CPU: run, skip with the reason, or fail under FINEMOE_REQUIRE_GPU."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import gpu_guard
from tests.gpu_guard import Outcome, decide

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ERROR = "ModuleNotFoundError: No module named 'megablocks_ops'"


@pytest.mark.parametrize("required", [False, True])
@pytest.mark.parametrize("needs_kernels", [False, True])
def test_without_cuda_every_gpu_test_skips_or_fails_when_required(required, needs_kernels):
    outcome, reason = decide(needs_kernels=needs_kernels, required=required, cuda=False, kernels_error=None)
    assert outcome is (Outcome.fail if required else Outcome.skip)
    assert "needs CUDA" in reason
    assert ("FINEMOE_REQUIRE_GPU=1" in reason) is required


@pytest.mark.parametrize("required", [False, True])
def test_with_cuda_missing_kernels_skip_or_fail_only_the_kernel_tests(required):
    outcome, reason = decide(needs_kernels=True, required=required, cuda=True, kernels_error=IMPORT_ERROR)
    assert outcome is (Outcome.fail if required else Outcome.skip)
    assert IMPORT_ERROR in reason and "setup-device.sh" in reason
    # tests that need CUDA only still run
    assert decide(needs_kernels=False, required=required, cuda=True, kernels_error=IMPORT_ERROR) == (
        Outcome.run,
        "",
    )


@pytest.mark.parametrize("required", [False, True])
def test_with_cuda_and_kernels_everything_runs(required):
    for needs_kernels in (False, True):
        got = decide(needs_kernels=needs_kernels, required=required, cuda=True, kernels_error=None)
        assert got == (Outcome.run, "")


@pytest.mark.parametrize(
    ("value", "required"),
    [(None, False), ("", False), ("0", False), ("no", False), ("1", True), ("true", True), (" YES ", True)],
)
def test_gpu_required_reads_the_environment(value, required):
    env = {} if value is None else {gpu_guard.REQUIRE_ENV: value}
    assert gpu_guard.gpu_required(env) is required


@pytest.fixture
def machine(monkeypatch):
    """Pretend CUDA is present (or not) and the kernels import (or not)."""

    def set_machine(cuda: bool, kernels_error: str | None, required: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(gpu_guard, "kernels_error", lambda: kernels_error)
        if required:
            monkeypatch.setenv(gpu_guard.REQUIRE_ENV, "1")
        else:
            monkeypatch.delenv(gpu_guard.REQUIRE_ENV, raising=False)

    return set_machine


def test_guard_skips_fails_or_returns(machine):
    machine(cuda=True, kernels_error=IMPORT_ERROR, required=False)
    gpu_guard.guard(needs_kernels=False)  # CUDA-only tests run
    with pytest.raises(pytest.skip.Exception, match="megablocks_ops"):
        gpu_guard.guard(needs_kernels=True)
    machine(cuda=True, kernels_error=IMPORT_ERROR, required=True)
    with pytest.raises(pytest.fail.Exception, match="FINEMOE_REQUIRE_GPU=1 .*megablocks_ops"):
        gpu_guard.guard(needs_kernels=True)
    machine(cuda=False, kernels_error=None, required=True)
    with pytest.raises(pytest.fail.Exception, match="needs CUDA"):
        gpu_guard.guard(needs_kernels=False)
    machine(cuda=True, kernels_error=None, required=True)
    gpu_guard.guard(needs_kernels=True)


def test_cli_exit_status(machine, capsys):
    machine(cuda=True, kernels_error=IMPORT_ERROR, required=True)
    assert gpu_guard.main() == 1
    out = capsys.readouterr().out
    assert "@pytest.mark.gpu: run\n" in out and "@pytest.mark.megablocks: fail" in out
    machine(cuda=True, kernels_error=IMPORT_ERROR, required=False)
    assert gpu_guard.main() == 0
    assert "@pytest.mark.megablocks: skip (needs megablocks" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the real GPU test modules")
def test_gpu_test_modules_skip_on_cpu_and_fail_when_required():
    """The marks reach the guard through conftest's hook: skipped here, and with FINEMOE_REQUIRE_GPU=1
    failed in setup (pytest reports those as errors; the exit status is 1 either way)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/moe/test_megablocks_gpu.py"]
    env = {k: v for k, v in os.environ.items() if k != gpu_guard.REQUIRE_ENV}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "2 skipped" in res.stdout, res.stdout[-2000:]
    env[gpu_guard.REQUIRE_ENV] = "1"
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "2 errors" in res.stdout, res.stdout[-2000:]
    assert "FINEMOE_REQUIRE_GPU=1 but this test needs CUDA" in res.stdout


def _gpu_checks():
    """benchmarks/gpu_checks.py (gpu.sh's step checks: the same rule applied to pytest's summary line)."""
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("summary", "required", "status", "outcome"),
    [
        ("17 passed in 9.12s", True, 0, "ok (17 passed)"),
        (
            "15 passed, 2 skipped in 9.12s",
            True,
            1,
            "FAILED (pytest with FINEMOE_REQUIRE_GPU=1: 15 passed, 2 skipped)",
        ),
        ("16 passed, 1 xfailed, 3 warnings in 9.12s", True, 1, "FAILED (pytest with"),
        ("15 passed, 2 skipped in 9.12s", False, 0, "ok (15 passed, 2 skipped)"),
        ("19 skipped in 0.20s", False, 3, "SKIPPED (no CUDA: rehearsal)"),
        ("19 skipped in 0.20s", True, 1, "FAILED (pytest with"),
        ("=== 1 failed, 16 passed in 9.12s ===", False, 1, "FAILED (pytest: 1 failed, 16 passed)"),
        ("2 errors in 0.04s", True, 1, "FAILED (pytest: 2 errors)"),
        ("no summary here", False, 1, "FAILED (no pytest summary line"),
    ],
)
def test_gpu_sh_reads_pytest_summaries_by_the_same_rule(summary, required, status, outcome):
    got_status, got = _gpu_checks().pytest_outcome(
        f"....\n-- Docs: https://docs.pytest.org\n{summary}\n", required
    )
    assert got_status == status and got.startswith(outcome), got


def test_gpu_sh_fails_moe_layer_rows_skipped_for_want_of_kernels():
    checks = _gpu_checks()
    rows = [
        {"impl": "finemoe torch", "shape": "s", "ms": 1.0, "check_ok": True},
        {"impl": "megablocks dMoE", "shape": "s+shared", "skipped": checks.BY_DESIGN[0]},
        {"impl": "finemoe megablocks", "shape": "s", "skipped": "megablocks/grouped_gemm not installed"},
    ]
    status, outcome = checks.moe_layer_outcome({"results": rows}, required=True)
    assert status == 1 and "megablocks/grouped_gemm not installed" in outcome
    status, outcome = checks.moe_layer_outcome({"results": rows}, required=False)
    assert status == 0 and outcome.startswith("ok (1 rows timed")
    assert checks.moe_layer_outcome({"results": rows[:2]}, required=True) == (0, "ok (1 rows timed)")
