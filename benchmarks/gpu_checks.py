"""benchmarks/gpu.sh's checks of a step that exited 0: did it really do what it was run for?

    python benchmarks/gpu_checks.py pytest LOG              # pytest's summary: skips/xfails count as failures
    python benchmarks/gpu_checks.py moe-layer MOE_LAYER_JSON # no row skipped for want of CUDA or kernels
    python benchmarks/gpu_checks.py trainer RUN_DIR STEPS    # every step logged, finite, applied; eval; checkpoint

The last line printed is the step's outcome for summary.txt. Exit status: 0 passed, 1 failed, 3 nothing ran
for want of CUDA where that is allowed (`FINEMOE_REQUIRE_GPU` unset: gpu.sh's CPU rehearsal only).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before benchmarks/ itself, whose data.py would shadow the data package

from tests.gpu_guard import REQUIRE_ENV, gpu_required  # noqa: E402  (one rule for tests and gpu.sh)

PASSED, FAILED, SKIPPED = 0, 1, 3
# moe_layer.py's skip reasons that are part of the benchmark's design, not a missing requirement
BY_DESIGN = ("no sigmoid-gated shared expert in stock megablocks",)
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected|warnings?)\b")


def pytest_outcome(log: str, required: bool) -> tuple[int, str]:
    """From pytest's final summary line ("17 passed, 2 skipped in 9.1s")."""
    lines = [ln for ln in log.splitlines() if _COUNT.search(ln) and re.search(r" in [\d.]+s", ln)]
    if not lines:
        return FAILED, "FAILED (no pytest summary line in the output)"
    found = _COUNT.findall(lines[-1])
    counts = {
        kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(n) for n, kind in found
    }
    summary = ", ".join(f"{n} {kind}" for n, kind in found if not kind.startswith("warning"))
    not_run = any(counts.get(k) for k in ("skipped", "xfailed", "xpassed"))
    if counts.get("failed") or counts.get("error"):
        return FAILED, f"FAILED (pytest: {summary})"
    if not_run and required:
        return FAILED, f"FAILED (pytest with {REQUIRE_ENV}=1: {summary})"
    if not counts.get("passed"):
        return (
            (SKIPPED, "SKIPPED (no CUDA: rehearsal)") if not_run else (FAILED, f"FAILED (pytest: {summary})")
        )
    return PASSED, f"ok ({summary})"


def moe_layer_outcome(payload: dict, required: bool) -> tuple[int, str]:
    rows = payload["results"]
    bad = [r for r in rows if r.get("error") or r.get("check_ok") is False]
    if bad:
        return FAILED, "FAILED (" + "; ".join(f"{r['impl']} / {r['shape']}: check failed" for r in bad) + ")"
    missing = sorted({r["skipped"] for r in rows if r.get("skipped") and r["skipped"] not in BY_DESIGN})
    timed = sum("ms" in r for r in rows)
    if missing and required:
        return FAILED, f"FAILED ({REQUIRE_ENV}=1 but rows skipped: {'; '.join(missing)})"
    if missing:
        return PASSED, f"ok ({timed} rows timed; others skipped: {'; '.join(missing)})"
    return PASSED, f"ok ({timed} rows timed)"


def trainer_outcome(run: Path, steps: int) -> tuple[int, str]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return FAILED, f"FAILED (no {path})"
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    by_step = {r["step"]: r for r in records}
    problems = []
    if sorted(by_step) != list(range(1, steps + 1)):
        problems.append(f"logged steps {sorted(by_step)}, expected 1..{steps}")
    losses = [by_step[s]["train/loss"] for s in sorted(by_step) if "train/loss" in by_step[s]]
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"train/loss {losses}")
    last = by_step.get(steps, {})
    if last.get("train/skipped_steps", 1.0) != 0.0:
        problems.append(f"train/skipped_steps {last.get('train/skipped_steps')} (non-finite steps)")
    if not math.isfinite(last.get("eval/loss", math.nan)):
        problems.append(f"eval/loss at step {steps}: {last.get('eval/loss')}")
    ckpt = run / "checkpoints" / f"step_{steps:08d}"
    if not ckpt.is_dir():
        problems.append(f"no checkpoint {ckpt.name}")
    if problems:
        return FAILED, "FAILED (" + "; ".join(problems) + ")"
    tok_s = last.get("perf/tokens_per_s", math.nan)
    return PASSED, (
        f"ok (loss {losses[0]:.3f} -> {losses[-1]:.3f}, eval {last['eval/loss']:.3f}, {tok_s:,.0f} tokens/s)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("pytest").add_argument("log", type=Path)
    sub.add_parser("moe-layer").add_argument("json", type=Path)
    t = sub.add_parser("trainer")
    t.add_argument("run", type=Path)
    t.add_argument("steps", type=int)
    args = p.parse_args()
    required = gpu_required()
    if args.what == "pytest":
        status, line = pytest_outcome(args.log.read_text(errors="replace"), required)
    elif args.what == "moe-layer":
        status, line = moe_layer_outcome(json.loads(args.json.read_text()), required)
    else:
        status, line = trainer_outcome(args.run, args.steps)
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
