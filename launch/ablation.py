"""Upcycling ablation: one dense model, several ways to turn it into an MoE, the same training after.

    python -m launch.ablation                                   # --size cpu: ~15 min on 2 CPU cores
    python -m launch.ablation --size tiny --run-dir /tmp/abl --wandb disabled    # a smoke run (~1 min)
    python -m launch.ablation --size gpu -- data.sources.0.path=/data/corpus/*.jsonl   # one H100
    python -m launch.ablation --dense runs/ablation/dense_hf    # reuse a dense HF checkpoint
    python -m launch.ablation --dense D --variants finegrained_r0 finegrained_r50 --seeds 0 1 \\
        --run-dir runs/ablation_seeds                           # the noise level of two variants

Stages, each the project's own command line, printed before it runs:
1. dense pretraining (`experiment=upcycle_ablation_dense`) and its export, unless `--dense` is given;
2. per variant: `python -m upcycle` (not for `scratch` and `dense`), then `python -m train
   experiment=upcycle_ablation_moe` for the same steps, data order and seed;
3. `<run-dir>/ablation_eval_loss.png`, `ablation_table.md` and `results.json` (eval loss against
   tokens), and one wandb run (offline by default) with a panel per variant.

Design choices:
- The MoE shapes are derived from the dense FFN width F with the ratios of `configs/model/tiny_moe`
  (14 routed experts of F/4, top-2, a shared expert of F/2: activated FFN width F, total 4F), so
  every size and any `--dense` checkpoint get the same comparison. Where a strategy cannot realise
  that shape the closest one is used and the table says so: `copy` is 4 copies of F, top-1 (same
  activated and total parameters, no shared expert, renormalised top-1 so the router learns only
  from the balance losses); `split` partitions F into 4 experts of F/4, top-2 (half the activated
  and a quarter of the total FFN parameters: a partition cannot grow the FFN).
- `scratch` is `model=tiny_moe` with every dimension set from the dense config.json, so it is the
  same architecture as the `finegrained` variants, randomly initialised with the same seed.
- Variants run `--jobs` at a time with cores/jobs intra-op threads each: on a 2-core machine two
  1-thread runs finish sooner than one 2-thread run after another, and they do not collapse when
  other jobs share the cores (OpenMP's spinning threads do).
- The `metrics.jsonl` of each run is the only thing read back; nothing is imported from train/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli import guarded
from launch.ablation_report import (
    RunResult,
    budgets_of,
    eval_curve,
    log_wandb,
    markdown_table,
    plot,
    read_metrics,
    train_ce_tail,
)

PROG = "python -m launch.ablation"


# ---- what is compared --------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    init: str
    """'upcycle' (python -m upcycle, then train), 'scratch' (random MoE) or 'dense' (continue the dense model)."""
    shape: str = "finegrained"
    """Key of SHAPES: the MoE shape as a function of the dense FFN width."""
    recipe: tuple[str, ...] = ()
    """`upcycle.*` overrides (the strategy first)."""
    note: str = ""
    """What differs from the reference shape, for the table."""


def _shape(num: int, top_k: int, width: int, shared: int, norm_topk: bool) -> dict[str, Any]:
    return {
        "num_experts": num,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": width,
        "shared_expert_intermediate_size": shared,
        "norm_topk_prob": norm_topk,
    }


# MoE shape fields per dense FFN width F (a multiple of 4); "finegrained" is tiny_moe's 14 x 88 + 176
# at F = 352.
SHAPES = {
    "finegrained": lambda f: _shape(14, 2, f // 4, f // 2, False),
    "finegrained_norm": lambda f: _shape(14, 2, f // 4, f // 2, True),
    "copy": lambda f: _shape(4, 1, f, 0, True),
    "split": lambda f: _shape(4, 2, f // 4, 0, False),
}

VARIANTS = {
    v.name: v
    for v in (
        Variant(
            name="scratch", label="MoE from scratch", init="scratch", note="14 x F/4, top-2, + shared F/2"
        ),
        Variant(
            name="copy",
            label="copy (sparse upcycling)",
            init="upcycle",
            shape="copy",
            recipe=("upcycle.strategy=copy",),
            note="4 x F, top-1, no shared expert",
        ),
        Variant(
            name="split",
            label="split (LLaMA-MoE, random)",
            init="upcycle",
            shape="split",
            # softmax gating, scale 1: the recorded runs (docs/ablation.md) predate LLaMA-MoE's gating,
            # now split's default (renormalised top-k, output x E / K)
            recipe=("upcycle.strategy=split", "upcycle.split_method=random", "upcycle.split_gating=softmax"),
            note="4 x F/4, top-2, no shared expert: half the activated FFN",
        ),
        Variant(
            name="finegrained_r0",
            label="finegrained, no re-init",
            init="upcycle",
            recipe=("upcycle.strategy=finegrained", "upcycle.reinit_fraction=0.0"),
        ),
        Variant(
            name="finegrained_r50",
            label="finegrained, 50% re-init (Qwen)",
            init="upcycle",
            recipe=("upcycle.strategy=finegrained", "upcycle.reinit_fraction=0.5"),
        ),
        Variant(
            name="granular",
            label="granular (NVIDIA, paper scaling)",
            init="upcycle",
            recipe=("upcycle.strategy=granular",),
        ),
        # not in the default set
        Variant(
            name="granular_exact",
            label="granular, exact variant",
            init="upcycle",
            shape="finegrained_norm",
            recipe=("upcycle.strategy=granular", "upcycle.granular_exact=true"),
            note="norm_topk_prob=true",
        ),
        Variant(name="dense", label="dense, continued", init="dense", note="the dense model itself"),
    )
}
DEFAULT_VARIANTS = ("scratch", "copy", "split", "finegrained_r0", "finegrained_r50", "granular")


@dataclass(frozen=True)
class Size:
    dense_preset: str
    moe_preset: str
    dense_overrides: tuple[str, ...] = ()
    moe_overrides: tuple[str, ...] = ()


SIZES = {
    "cpu": Size(dense_preset="upcycle_ablation_dense", moe_preset="upcycle_ablation_moe"),
    # every stage a handful of steps on a 2-layer model: tests the pipeline, measures nothing
    "tiny": Size(
        dense_preset="upcycle_ablation_dense",
        moe_preset="upcycle_ablation_moe",
        dense_overrides=tuple(
            [
                "max_steps=6",
                "eval_every=3",
                "eval_batches=1",
                "model.num_hidden_layers=2",
                "data.seq_len=32",
                "deepspeed.micro_batch_size=2",
                "logging.progress=false",
            ]
        ),
        moe_overrides=tuple(
            [
                "max_steps=4",
                "eval_every=1",
                "eval_batches=1",
                "data.seq_len=32",
                "deepspeed.micro_batch_size=2",
            ]
        ),
    ),
    "gpu": Size(dense_preset="upcycle_ablation_gpu_dense", moe_preset="upcycle_ablation_gpu_moe"),
}


def moe_shape(variant: Variant, dense_ffn: int) -> dict[str, Any]:
    if dense_ffn % 4:
        raise ValueError(f"the dense intermediate_size={dense_ffn} must be a multiple of 4 (experts of F/4)")
    return dict(SHAPES[variant.shape](dense_ffn))


def hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


# ---- running ------------------------------------------------------------------------------------
_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def run(cmd: list[str], env: dict[str, str], log: Path | None = None, tag: str = "") -> float:
    """Run one stage; to the console, or appended to `log`. Returns the wall time in seconds."""
    say(f"\n{tag}$ {shlex.join(cmd)}" + (f"\n{tag}  (log: {log})" if log else ""))
    t = time.time()
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        with log.open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            res = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if res.returncode:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{tag}exit status {res.returncode}: {shlex.join(cmd)}\n--- {log} ---\n{tail}")
    dt = time.time() - t
    say(f"{tag}  ({dt:.0f} s)")
    return dt


def train_variant(
    variant: Variant,
    seed: int,
    dense_hf: Path,
    root: Path,
    common: list[str],
    size: Size,
    extra: list[str],
    env: dict[str, str],
) -> RunResult:
    from moe.config import ARCH_FIELDS
    from moe.hf import read_config

    name = f"{variant.name}-s{seed}"
    tag = f"[{name}] "
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    log.write_text("")
    dense_cfg, _ = read_config(dense_hf)
    run_dir = root / "train" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: metrics.jsonl is appended to otherwise
    cmd = [
        sys.executable,
        "-m",
        "train",
        f"experiment={size.moe_preset}",
        f"run_dir={run_dir}",
        f"seed={seed}",
        "checkpoint.resume=none",
        f"logging.name=ablation-{name}",
        *common,
        *size.moe_overrides,
    ]
    upcycle_s, report = 0.0, {}
    if variant.init == "upcycle":
        shape = moe_shape(variant, dense_cfg.intermediate_size)
        out = root / "upcycled" / name
        upcycle_s = run(
            [
                sys.executable,
                "-m",
                "upcycle",
                f"source={dense_hf}",
                f"output={out}",
                "upcycle/moe@moe=tiny_moe",
                *(f"moe.{k}={hydra_value(v)}" for k, v in shape.items()),
                *variant.recipe,
                f"upcycle.seed={seed}",
                "upcycle.overwrite=true",
                "upcycle.progress=false",
            ],
            env,
            log,
            tag,
        )
        report = json.loads((out / "upcycle_report.json").read_text())
        model_cfg, _ = read_config(out)
        cmd.append(f"init_from={out}")
    elif variant.init == "dense":
        model_cfg = dense_cfg
        cmd.append(f"init_from={dense_hf}")
    else:
        # a from-scratch MoE copies the dense architecture (and special tokens) from its config.json
        fields = {f: getattr(dense_cfg, f) for f in (*ARCH_FIELDS, "bos_token_id", "eos_token_id")}
        fields |= moe_shape(variant, dense_cfg.intermediate_size)
        fields |= {"decoder_sparse_step": 1, "mlp_only_layers": []}
        model_cfg = dataclasses.replace(dense_cfg, **fields)
        cmd += [f"model.{k}={hydra_value(v)}" for k, v in fields.items() if v is not None]
    train_s = run([*cmd, *extra], env, log, tag)
    records = read_metrics(run_dir)
    tokens, losses = eval_curve(records)
    params = model_cfg.num_params()
    result = RunResult(
        variant=variant.name,
        seed=seed,
        label=variant.label,
        note=variant.note,
        tokens=tokens,
        eval_loss=losses,
        train_ce_tail=train_ce_tail(records),
        params_total=params["total"],
        params_activated=params["activated"],
        train_s=train_s,
        upcycle_s=upcycle_s,
        upcycle_report={k: report["plan"][k] for k in ("forced_fields", "strategy_plan")} if report else {},
    )
    say(f"{tag}done: eval loss {losses[-1]:.4f} after {tokens[-1]:,} tokens")
    return result


def pretrain_dense(run_dir: Path, out: Path, size: Size, overrides: list[str], env: dict[str, str]) -> float:
    """Stage 1: train the dense model and export it to a Hugging Face directory. Returns seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    train = [f"experiment={size.dense_preset}", f"run_dir={run_dir}", "logging.name=ablation-dense"]
    export = [f"checkpoint={run_dir}", f"output={out}", "dtype=float32", "overwrite=true"]
    seconds = run([sys.executable, "-m", "train", *train, *size.dense_overrides, *overrides], env)
    return seconds + run([sys.executable, "-m", "train.export", *export], env)


def dense_reference(dense_hf: Path) -> RunResult | None:
    """The dense model's own pretraining curve, when its export says where the run is."""
    from moe.hf import read_config

    report = dense_hf / "export_report.json"
    if not report.is_file():
        return None
    run_dir = Path(json.loads(report.read_text())["source_checkpoint"]).parents[1]
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    records = read_metrics(run_dir)
    tokens, losses = eval_curve(records)
    if not tokens:
        return None
    params = read_config(dense_hf)[0].num_params()
    return RunResult(
        variant="dense_pretraining",
        seed=-1,
        label="dense from scratch (stage 1)",
        note="the dense model: F wide, its own tokens",
        tokens=tokens,
        eval_loss=losses,
        train_ce_tail=train_ce_tail(records),
        params_total=params["total"],
        params_activated=params["activated"],
        train_s=0.0,
    )


# ---- main ---------------------------------------------------------------------------------------
def build_env(jobs: int, cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


@guarded(PROG)
def main() -> None:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="cpu", choices=sorted(SIZES))
    p.add_argument("--run-dir", default=None, help="default: runs/ablation (runs/ablation_<size> for others)")
    p.add_argument(
        "--dense", default=None, help="a dense Hugging Face Qwen2 directory to reuse (skips stage 1)"
    )
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS))
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds of the upcycling draws and the scratch init (train `seed`); the data order and eval "
        "batches stay fixed (data.seed), so runs with different seeds are compared on the same tokens",
    )
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    p.add_argument("--cpu", action="store_true", help="force CPU (DS_ACCELERATOR=cpu)")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument("overrides", nargs="*", help="after `--`: Hydra overrides for every training stage")
    args = p.parse_args()
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.dense and not (Path(args.dense) / "config.json").is_file():
        raise FileNotFoundError(f"--dense {args.dense}: not a Hugging Face checkpoint (no config.json)")

    import torch

    size = SIZES[args.size]
    root = Path(args.run_dir or ("runs/ablation" if args.size == "cpu" else f"runs/ablation_{args.size}"))
    root.mkdir(parents=True, exist_ok=True)
    cpu = args.cpu or not torch.cuda.is_available()
    env = build_env(args.jobs, cpu)
    common = [f"logging.wandb={args.wandb}"]
    start = time.time()
    say(
        f"ablation: size {args.size}, {args.jobs} at a time, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, in {root}/"
    )

    dense_s = 0.0
    if args.dense:
        dense_hf = Path(args.dense)
    else:
        dense_hf = root / "dense_hf"
        dense_s = pretrain_dense(root / "dense", dense_hf, size, [*common, *args.overrides], env)
    dense = dense_reference(dense_hf)

    jobs = [(VARIANTS[v], s) for s in args.seeds for v in args.variants]
    results: list[RunResult] = []
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(train_variant, v, s, dense_hf, root, common, size, list(args.overrides), env)
            for v, s in jobs
        ]
        for fut in futures:  # in submission order: the table follows --variants
            try:
                results.append(fut.result())
            except (RuntimeError, ValueError, OSError) as e:
                failures.append(str(e))
    if failures:
        for f in failures:
            say(f"\nFAILED: {f}")
        sys.exit(1)

    steps = {r.name: len(r.tokens) for r in results}
    if len({tuple(r.tokens) for r in results}) != 1:
        say(f"warning: the variants were evaluated at different token counts ({steps})")
    png = root / "ablation_eval_loss.png"
    title = f"upcycling ablation ({args.size}, eval loss)"
    plot(results, dense, png, title)
    table = markdown_table(results, dense)
    (root / "ablation_table.md").write_text(table)
    wall = time.time() - start
    summary = {
        "size": args.size,
        "dense": str(dense_hf),
        "dense_pretraining": dataclasses.asdict(dense) if dense else None,
        "budgets_tokens": budgets_of(results),
        "seeds": args.seeds,
        "overrides": args.overrides,
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "jobs": args.jobs,
        "device": "cpu" if cpu else torch.cuda.get_device_name(),
        "dense_stage_s": round(dense_s, 1),
        "wall_s": round(wall, 1),
        "runs": [dataclasses.asdict(r) | {"name": r.name} for r in results],
    }
    (root / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.wandb != "disabled":
        config = {k: v for k, v in summary.items() if k != "runs"}
        log_wandb(args.wandb, root, results, table, png, config)
    say(f"\n{table}\nplot {png}, table {root / 'ablation_table.md'}, results {root / 'results.json'}")
    say(f"ablation finished in {wall:.0f} s")


if __name__ == "__main__":
    main()
