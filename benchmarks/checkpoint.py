"""Benchmark: checkpoint save and resume per rank (bytes written and read, seconds), on CPU processes.

    python benchmarks/checkpoint.py [--procs 2 4] [--ep 1 2] [--repeats 3] [--model tiny_moe]
    python benchmarks/checkpoint.py --old-repo /tmp/old     # also the previous version, for "before"

For each process count and ep_size, every rank builds the model preset with ZeRO-1 and Adam state
(zero moments at step 1: the same bytes as after real steps), then saves `--repeats` checkpoints and
resumes from each with `train.checkpoint`, timing both (between barriers). Reported per rank:

- written: the bytes of the files this rank wrote (format 2: `meta.json` `io`; format 1: the size of
  the `ep*/` directory it wrote, plus its RNG file; rank 0 also writes the small buffers file);
- read: the bytes this rank's resume read from files (format 2: whole files, counted by the reader;
  format 1: every tensor it loads, i.e. the dense state and its expert-parallel rank's experts);
- save and resume seconds, the median over repeats, of the slowest rank.

`--old-repo` points at a checkout of the previous version (`git worktree add /tmp/old <commit>`):
the same worker runs with its `train.checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.repo)
    import torch

    from moe.model import Qwen2MoEForCausalLM
    from moe.params import load_preset
    from train import checkpoint
    from train import engine as ds
    from train.comm import Comm

    comm = Comm.init("cpu")
    ep = args.ep[0]
    cfg = load_preset(args.model)
    torch.manual_seed(0)
    model = Qwen2MoEForCausalLM(cfg)
    group = ds.shard_experts(model, ep)
    eng = ds.build_engine(
        model,
        ep_group_name=group,
        ep_size=ep,
        num_experts=cfg.num_experts,
        lr=1e-3,
        zero_stage=1,
        micro_batch_size=1,
    )
    ds.prepare_optimizer_state(eng, 1)
    run = Path(args.out) / "run"
    rows = []
    for r in range(args.repeats):
        step = r + 1
        comm.barrier()
        t0 = time.perf_counter()
        meta = {"tokens_seen": 0, "ep_size": ep}
        saved = checkpoint.save(eng, model, comm, run, step, meta, group, args.repeats + 1)
        t_save = time.perf_counter() - t0
        path = saved if isinstance(saved, Path) else saved.path
        comm.barrier()
        t0 = time.perf_counter()
        checkpoint.load(eng, model, path, comm)
        t_load = time.perf_counter() - t0
        comm.barrier()
        rows.append({"save_s": t_save, "load_s": t_load, "path": str(path)})
    ep_rank, edp_rank = ds.ep_info(group)
    out = {"rank": comm.rank, "ep_rank": ep_rank, "edp_rank": edp_rank, "rows": rows}
    out |= _bytes(checkpoint, Path(rows[-1]["path"]), model, comm.rank, ep_rank, edp_rank)
    Path(args.out, f"rank{comm.rank}.json").write_text(json.dumps(out))


def _bytes(checkpoint, ckpt: Path, model, rank: int, ep_rank: int, edp_rank: int) -> dict:
    """Bytes this rank wrote and read for `ckpt` (see the module docstring)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("format") == 2:
        written = meta["io"]["bytes_per_rank"][rank]
        # the reader's plan, recomputed: files assigned to this rank in its groups
        from train import checkpoint_store as store

        index = store.read_index(ckpt)
        owners = checkpoint._owners(model)
        params = list(model.named_parameters())
        plans = {n: checkpoint._logical(n, p, owners.get(n)) for n, p in params}
        dense = [k for n, _ in params if n not in owners for _, kns in plans[n] for k, _ in kns]
        expert = [k for n, _ in params if n in owners for _, kns in plans[n] for k, _ in kns]
        world = meta["world_size"]
        ep = meta.get("ep_size") or 1
        read = 0
        for keys, member, members in ((dense, rank, world), (expert, edp_rank, world // ep)):
            if not keys:
                continue
            r = store.GroupReader(ckpt, index, meta["files"], keys, member, members)
            mine = {rel for segs in r._mine.values() for _, _, rel in segs}
            read += sum(meta["files"][rel]["bytes"] for rel in mine)
        return {"written": written, "read": read}
    # format 1: the first EDP rank of each EP rank wrote ep<ep_rank>/; rank 0 also buffers
    written = sum(f.stat().st_size for f in (ckpt / f"ep{ep_rank:03d}").iterdir()) if edp_rank == 0 else 0
    written += (ckpt / "rng" / f"rank{rank:05d}.pt").stat().st_size
    if rank == 0 and (ckpt / "buffers.safetensors").is_file():
        written += (ckpt / "buffers.safetensors").stat().st_size
    read = sum(p.numel() * 4 * 3 for p in model.parameters())  # dense + this EP rank's experts, 3 kinds
    return {"written": written, "read": read}


def run_case(repo: str, procs: int, ep: int, repeats: int, model: str) -> list[dict]:
    sys.path.insert(0, str(REPO))  # before benchmarks/ itself, whose data.py would shadow the data package
    from train.engine import free_port

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs)]
        cmd += ["--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker"]
        cmd += ["--repo", repo, "--out", out, "--ep", str(ep), "--repeats", str(repeats), "--model", model]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=repo)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            raise SystemExit(f"worker failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(procs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="tiny_moe")
    p.add_argument("--old-repo", default=None, help="a checkout of the previous version, for 'before'")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:  # the gloo groups must not meet interpreter finalization; a `--old-repo` may predate this
            from cli import run_without_finalizing
        except ImportError:
            worker(args)
            return
        run_without_finalizing(lambda: worker(args))
    versions = [("after", str(REPO))] + ([("before", args.old_repo)] if args.old_repo else [])
    print(f"date: {time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPUs; model preset {args.model}")
    print(f"command: python benchmarks/checkpoint.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| version | procs | ep | written per rank (MB) | read per rank (MB) | save s | resume s |")
    print("|---|---:|---:|---|---|---:|---:|")
    for procs in args.procs:
        for ep in args.ep:
            if procs % ep:
                continue
            for name, repo in versions:
                ranks = run_case(repo, procs, ep, args.repeats, args.model)
                save_s = statistics.median(
                    max(r["rows"][i]["save_s"] for r in ranks) for i in range(args.repeats)
                )
                load_s = statistics.median(
                    max(r["rows"][i]["load_s"] for r in ranks) for i in range(args.repeats)
                )
                written, read = (" / ".join(f"{r[k] / 1e6:.2f}" for r in ranks) for k in ("written", "read"))
                print(f"| {name} | {procs} | {ep} | {written} | {read} | {save_s:.2f} | {load_s:.2f} |")


if __name__ == "__main__":
    main()
