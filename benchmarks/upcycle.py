"""Benchmark: upcycle a Qwen1.5-1.8B-shaped checkpoint into the Qwen1.5-MoE-A2.7B shape.

    python benchmarks/upcycle.py [--workdir DIR] [--num-layers N] [--strategy finegrained] [--keep]

1. Writes a randomly initialised dense checkpoint with Qwen1.5-1.8B's exact shapes (bf16, 3.7 GB).
2. Writes as many bytes as the upcycled checkpoint will have (28.6 GB at full depth) as plain files
   from a memory buffer, fsync'ed: the disk's own cost for that output, measured in the same run,
   once before and once after the upcycle (a shared disk's speed drifts).
3. Runs `python -m upcycle` (the default recipe) as a child process, fsyncs its output, and reports
   the wall time (interpreter start included) and the child's peak RSS from `wait4` (`ru_maxrss`,
   which counts memory-mapped source pages too, and the parent's RSS at spawn time: the parent
   stays small, step 1 runs in a child of its own), its CPU time (user + sys, which a machine
   shared with other jobs does not inflate as it does the wall time) and the load average around
   it. The run measures the init distance on the default calibration tokens (random ids: the source
   has no tokenizer) unless `--calibration-sequences 0`; its summary is the last row.

Targets (issue 4): peak RSS <= 3 GB, wall time <= 2x the plain write. `--num-layers` cuts the depth
when the disk is too small for 3.7 + 28.6 GB (each layer is about 1.15 GB of output); the table then
also extrapolates to 24 layers at the measured rates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moe.config import ModelConfig  # noqa: E402
from moe.hf import ShardedWriter, expected_hf_shapes, write_metadata  # noqa: E402
from moe.params import load_preset  # noqa: E402
from upcycle import MoEShape, UpcycleConfig, make_plan, plan_config  # noqa: E402
from upcycle.distance import summary_line  # noqa: E402

QWEN1_5_1_8B = load_preset("qwen1_5_1_8b")  # the public config.json (reference.md section 1)
GB = 1e9


def write_source(cfg: ModelConfig, out: Path) -> None:
    """A random dense checkpoint: N(0, 0.02) matrices, norms near 1, small biases (bf16)."""
    g = torch.Generator().manual_seed(0)
    with ShardedWriter(out, max_shard_bytes=2 * 1024**3, dtype=torch.bfloat16) as w:
        write_metadata(w, cfg, torch.bfloat16)
        for key, shape in expected_hf_shapes(cfg).items():
            t = torch.empty(shape)
            if key.endswith("norm.weight"):
                t.normal_(1.0, 0.1, generator=g)
            elif key.endswith(".bias"):
                t.normal_(0.0, 0.1, generator=g)
            else:
                t.normal_(0.0, cfg.initializer_range, generator=g)
            w.add(key, t.to(torch.bfloat16))
            del t


def fsync_dir(directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def plain_write(num_bytes: int, out: Path, shard_bytes: int) -> float:
    """Seconds to write `num_bytes` from memory into shard-sized files and fsync them."""
    out.mkdir(parents=True)
    buf = memoryview(os.urandom(64 << 20))
    start = time.perf_counter()
    left, i = num_bytes, 0
    while left > 0:
        with open(out / f"plain-{i:05d}.bin", "wb") as f:
            in_file = min(left, shard_bytes)
            left -= in_file
            while in_file > 0:
                n = min(in_file, len(buf))
                f.write(buf[:n])
                in_file -= n
            f.flush()
            os.fsync(f.fileno())
        i += 1
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed


def run_upcycle(src: Path, out: Path, strategy: str, calibration_sequences: int) -> tuple[float, int, float]:
    """(wall seconds including the output's fsync, peak RSS bytes, CPU seconds) of `python -m upcycle`."""
    cmd = [
        sys.executable,
        "-m",
        "upcycle",
        f"source={src}",
        f"output={out}",
        f"upcycle.strategy={strategy}",
        f"upcycle.calibration.num_sequences={calibration_sequences}",
        "upcycle.progress=false",
    ]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"upcycle failed with status {child.returncode}")
    fsync_dir(out)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def full_depth_bytes(strategy: str) -> int:
    moe, _ = plan_config(QWEN1_5_1_8B, MoEShape(), UpcycleConfig(strategy=strategy))
    return sum(int(torch.Size(s).numel()) for s in expected_hf_shapes(moe).values()) * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--num-layers", type=int, default=24, help="decoder layers (24 = full Qwen1.5-1.8B)")
    ap.add_argument("--strategy", default="finegrained")
    ap.add_argument("--keep", action="store_true", help="keep the source and output checkpoints")
    ap.add_argument(
        "--calibration-sequences",
        type=int,
        default=UpcycleConfig().calibration.num_sequences,
        help="sequences for the init distance (0: not measured)",
    )
    ap.add_argument("--write-source", type=Path, help=argparse.SUPPRESS)  # internal: step 1 in a child
    args = ap.parse_args()
    if args.write_source:
        write_source(QWEN1_5_1_8B.replace(num_hidden_layers=args.num_layers), args.write_source)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="upcycle-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    src, out, plain = workdir / "dense", workdir / "moe", workdir / "plain"

    # in a child: the upcycle child's ru_maxrss includes this process's RSS at spawn time (vfork + exec)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, __file__, "--num-layers", str(args.num_layers), "--write-source", str(src)],
        check=True,
    )
    gen_s = time.perf_counter() - t
    ucfg = UpcycleConfig(strategy=args.strategy)
    plan = make_plan(src, out, MoEShape(), ucfg)
    out_bytes = plan.bytes_to_write
    free = shutil.disk_usage(workdir).free
    if free < out_bytes * 1.05:
        raise SystemExit(
            f"{workdir}: {free / GB:.1f} GB free < {out_bytes / GB:.1f} GB to write; use --num-layers"
        )

    plain_before = plain_write(out_bytes, plain, ucfg.max_shard_bytes)
    load_before = os.getloadavg()[0]
    up_s, rss, cpu_s = run_upcycle(src, out, args.strategy, args.calibration_sequences)
    load_after = os.getloadavg()[0]
    distance = json.loads((out / "upcycle_report.json").read_text())["init_distance"]
    plain_after = plain_write(out_bytes, plain, ucfg.max_shard_bytes)
    plain_s = (plain_before + plain_after) / 2
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    num_shards = len(list(out.glob("*.safetensors")))
    if not args.keep:
        shutil.rmtree(out)
        shutil.rmtree(src)

    n = plan.moe.num_params()
    rows = [
        (
            "machine",
            f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GB:.0f} GB RAM",
        ),
        (
            "source",
            f"Qwen1.5-1.8B shapes, {args.num_layers} layers, bf16, random ({gen_s:.0f} s to generate)",
        ),
        (
            "output",
            f"A2.7B shape, {args.strategy}: {n['total'] / 1e9:.3f}B params, {num_shards} shards, "
            f"{written / GB:.2f} GB on disk ({out_bytes:,} B of tensors)",
        ),
        (
            "plain write of the same bytes",
            f"{plain_before:.1f} s before, {plain_after:.1f} s after (mean {out_bytes / plain_s / GB:.2f} GB/s)",
        ),
        (
            "upcycle wall time (CLI, incl. start and fsync)",
            f"{up_s:.1f} s ({out_bytes / up_s / GB:.2f} GB/s)",
        ),
        ("upcycle CPU time (user + sys)", f"{cpu_s:.1f} s"),
        ("load average (1 min) before / after the upcycle", f"{load_before:.1f} / {load_after:.1f}"),
        ("ratio upcycle / plain write", f"{up_s / plain_s:.2f} (target <= 2)"),
        ("peak RSS (upcycle process)", f"{rss / GB:.2f} GB (target <= 3)"),
        ("init distance (in the run above)", summary_line(distance)),
    ]
    if args.num_layers < QWEN1_5_1_8B.num_hidden_layers:
        full = full_depth_bytes(args.strategy)
        rows.append(
            (
                "extrapolated to 24 layers",
                f"{full / GB:.2f} GB: plain write {full / (out_bytes / plain_s):.0f} s, "
                f"upcycle {full / (out_bytes / up_s):.0f} s (same rates)",
            )
        )
    print()
    print("| measurement | value |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
