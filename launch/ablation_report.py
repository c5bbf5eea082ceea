"""The ablation's outputs: eval-loss curves read from each run's metrics.jsonl, the table at fixed
token budgets, the plot and the wandb summary run. Used by `launch/ablation.py`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUDGETS = (0.25, 0.5, 1.0)
"""Fractions of the MoE stage's tokens at which the table reports eval loss."""


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def eval_curve(records: list[dict[str, float]]) -> tuple[list[int], list[float]]:
    """(tokens seen, eval loss) at every evaluation of a run."""
    points = [(int(r["train/tokens_seen"]), float(r["eval/loss"])) for r in records if "eval/loss" in r]
    return [t for t, _ in points], [loss for _, loss in points]


@dataclass
class RunResult:
    variant: str
    seed: int
    label: str
    note: str
    tokens: list[int]
    eval_loss: list[float]
    train_ce_tail: float
    """Mean training cross-entropy over the last 10% of steps (the gap to eval loss is memorisation)."""
    params_total: int
    params_activated: int
    train_s: float
    upcycle_s: float = 0.0
    upcycle_report: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.variant}-s{self.seed}"


def train_ce_tail(records: list[dict[str, float]]) -> float:
    steps = [r for r in records if "train/ce_loss" in r]  # not the step-0 evaluation
    tail = steps[-max(1, len(steps) // 10) :]
    return sum(float(r["train/ce_loss"]) for r in tail) / len(tail)


def loss_at(result: RunResult, budget: int) -> float:
    """Eval loss at the last evaluation with at most `budget` tokens."""
    seen = [loss for t, loss in zip(result.tokens, result.eval_loss) if t <= budget]
    return seen[-1] if seen else float("nan")


def budgets_of(results: list[RunResult]) -> list[int]:
    total = max(r.tokens[-1] for r in results)
    points = sorted({t for r in results for t in r.tokens})
    # the last evaluation at or before each fraction of the run
    return [
        max(t for t in points if t <= f * total + 0.5) for f in BUDGETS if any(t <= f * total for t in points)
    ]


def by_variant(results: list[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.variant, []).append(r)
    return groups


def markdown_table(results: list[RunResult], dense: RunResult | None = None) -> str:
    """Eval loss of every variant at the budgets; `dense` is the stage-1 run, shown for reference."""
    budgets = budgets_of(results)
    total = budgets[-1]
    head = ["variant", "activated / total params"] + [
        f"{t / total:.0%} ({t / 1e6:.2f}M tok)" if t >= 1e5 else f"{t / total:.0%} ({t:,} tok)"
        for t in budgets
    ]
    head += ["vs scratch at 100%", "train CE, last 10%", "shape"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = by_variant(results)
    scratch = groups.get("scratch")
    ref = sum(loss_at(r, total) for r in scratch) / len(scratch) if scratch else None
    for runs in [*groups.values(), *([[dense]] if dense else [])]:
        cells = [runs[0].label, f"{runs[0].params_activated / 1e6:.2f}M / {runs[0].params_total / 1e6:.2f}M"]
        for t in budgets:
            values = [loss_at(r, t) for r in runs]
            mean = sum(values) / len(values)
            cells.append(
                f"{mean:.3f}"
                if len(values) == 1
                else f"{mean:.3f} ({' / '.join(f'{v:.3f}' for v in values)})"
            )
        final = sum(loss_at(r, total) for r in runs) / len(runs)
        cells.append(f"{final - ref:+.3f}" if ref is not None and runs[0].variant != "scratch" else "")
        cells.append(" / ".join(f"{r.train_ce_tail:.3f}" for r in runs))
        cells.append(runs[0].note or "as scratch")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r.seed for r in results})
    lines.append("")
    lines.append(
        f"Eval loss (nats/token, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {seeds}; "
        "several seeds: mean (each seed)). Lower is better."
    )
    if dense is not None:
        lines.append(
            f"The last row is stage 1 (the dense model trained from scratch, over its own tokens); the "
            f"upcycled variants start from its end point, eval loss {dense.eval_loss[-1]:.3f}."
        )
    return "\n".join(lines) + "\n"


def plot(results: list[RunResult], dense: RunResult | None, path: Path, title: str) -> None:
    """Eval loss against tokens, full run and second half; `dense` is the stage-1 run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    total = max(r.tokens[-1] for r in results)
    unit, unit_name = (1e6, "M") if total >= 1e5 else (1.0, "")
    for ax, zoom in zip(axes, (False, True)):
        tail: list[float] = []
        for i, runs in enumerate(by_variant(results).values()):
            for j, r in enumerate(runs):
                x = [t / unit for t in r.tokens]
                ax.plot(
                    x,
                    r.eval_loss,
                    color=colors[i % len(colors)],
                    linestyle=("-", "--", ":", "-.")[j % 4],
                    marker="." if len(x) < 40 else None,
                    label=r.label if len(runs) == 1 else f"{r.label}, seed {r.seed}",
                )
                tail += [v for t, v in zip(r.tokens, r.eval_loss) if t >= total / 2]
        if dense is not None:
            x = [t / unit for t in dense.tokens]
            ax.plot(x, dense.eval_loss, color="grey", linestyle="--", label=dense.label)
            ax.axhline(dense.eval_loss[-1], color="grey", linestyle=":", label="start point of the upcycled")
            tail.append(dense.eval_loss[-1])
        ax.set_xlabel(f"tokens{f' ({unit_name})' if unit_name else ''}")
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        if zoom and tail:
            ax.set_xlim(total / 2 / unit, total * 1.02 / unit)
            pad = 0.1 * (max(tail) - min(tail) + 1e-3)
            ax.set_ylim(min(tail) - pad, max(tail) + pad)
            ax.set_title("second half (zoom)")
        else:
            ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_wandb(
    mode: str, root: Path, results: list[RunResult], table_md: str, png: Path, config: dict
) -> None:
    """One run with a panel per variant (x axis: tokens), an overlay chart, the table and the PNG."""
    import wandb

    run = wandb.init(
        project="finemoe",
        name=f"upcycle-ablation-{root.name}",
        dir=str(root),
        mode=mode,  # type: ignore[arg-type]
        config=config,
    )
    run.define_metric("tokens")
    run.define_metric("ablation/*", step_metric="tokens")
    for r in results:
        for t, loss in zip(r.tokens, r.eval_loss):
            run.log({f"ablation/{r.name}/eval_loss": loss, "tokens": t})
    xs = sorted({t for r in results for t in r.tokens})
    series = [[dict(zip(r.tokens, r.eval_loss)).get(t, float("nan")) for t in xs] for r in results]
    run.log(
        {
            "ablation/eval_loss_vs_tokens": wandb.plot.line_series(
                xs=xs, ys=series, keys=[r.name for r in results], title="eval loss", xname="tokens"
            ),
            "ablation/plot": wandb.Image(str(png)),
            "ablation/table": wandb.Html(f"<pre>{table_md}</pre>"),
        }
    )
    run.finish()
