"""Start `python -m train` under DeepSpeed's launcher, on one node or many.

    python -m launch.run --num-gpus 8 -- experiment=quickstart_dense      # one node
    python -m launch.run --hostfile launch/hostfile.example -- parallel=ep8  # many nodes (pdsh)
    python -m launch.run --hostfile H --node-rank 1 --master-addr node1 -- ...  # one node of many (SLURM)
    python -m launch.run --dry-run ...                                        # print, run nothing

Multi-node runs use DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) with the same
`--world_info` that the `deepspeed` command would compute from the hostfile; `--dry-run` prints the
command of every node, which is exactly what `deepspeed --hostfile` would start there over pdsh.

SIGTERM (preemption, SLURM's `--signal`) is forwarded to the trainers of this node themselves, not
to DeepSpeed's launcher: the launcher answers SIGTERM by terminating the trainers and SIGKILLing them
30 s later, too soon to write a large checkpoint. A trainer that gets SIGTERM finishes its step,
saves and exits 0, and the launchers then exit by themselves (docs/checkpoints.md: sizing the grace).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cli import guarded

PROG = "python -m launch.run"
# Environment that matters for NCCL on multi-node GPU clusters; passed through when set.
NCCL_ENV = (
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "NCCL_IB_DISABLE",
    "NCCL_DEBUG",
    "NCCL_NET_GDR_LEVEL",
    "NCCL_CROSS_NIC",
    "NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "CUDA_DEVICE_MAX_CONNECTIONS",
)


def read_hostfile(path: str | Path) -> dict[str, int]:
    """`host slots=N` per line (DeepSpeed's format); '#' starts a comment."""
    hosts: dict[str, int] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise ValueError(f"{path}:{n}: expected 'hostname slots=N', got {raw!r}")
        slots = int(parts[1].removeprefix("slots="))
        if slots <= 0 or parts[0] in hosts:
            raise ValueError(f"{path}:{n}: slots must be positive and hosts unique ({raw!r})")
        hosts[parts[0]] = slots
    if not hosts:
        raise ValueError(f"{path}: no hosts")
    return hosts


def world_info(hosts: dict[str, int]) -> str:
    """DeepSpeed's encoding of {host: [local device ids]}."""
    info = {h: list(range(n)) for h, n in hosts.items()}
    return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()


def node_commands(
    hosts: dict[str, int], master_addr: str, master_port: int, overrides: list[str]
) -> list[list[str]]:
    """One `deepspeed.launcher.launch` command per node, in hostfile order (node rank = position)."""
    info = world_info(hosts)
    return [
        [
            sys.executable,
            "-u",
            "-m",
            "deepspeed.launcher.launch",
            f"--world_info={info}",
            f"--node_rank={rank}",
            f"--master_addr={master_addr}",
            f"--master_port={master_port}",
            "--module",
            "train",
            *overrides,
        ]
        for rank in range(len(hosts))
    ]


@guarded(PROG)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines) for multi-node runs")
    p.add_argument("--num-gpus", type=int, default=None, help="processes on this node (single-node runs)")
    p.add_argument(
        "--master-addr", default=None, help="default: the first host of the hostfile, or 127.0.0.1"
    )
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument(
        "--node-rank", type=int, default=None, help="run only this node's command (SLURM: $SLURM_NODEID)"
    )
    p.add_argument("--cpu", action="store_true", help="DS_ACCELERATOR=cpu (gloo), for laptops and CI")
    p.add_argument("--dry-run", action="store_true", help="print the commands and environment, run nothing")
    args = p.parse_args(argv)
    if args.hostfile and not Path(args.hostfile).is_file():
        raise FileNotFoundError(f"--hostfile {args.hostfile}: no such file")

    env = {k: os.environ[k] for k in NCCL_ENV if k in os.environ}
    if args.cpu:
        env["DS_ACCELERATOR"] = "cpu"
    if args.hostfile:
        hosts = read_hostfile(args.hostfile)
        master = args.master_addr or next(iter(hosts))
        cmds = node_commands(hosts, master, args.master_port, overrides)
        if args.node_rank is not None:
            if not 0 <= args.node_rank < len(cmds):
                raise ValueError(
                    f"--node-rank {args.node_rank} outside the {len(cmds)} hosts of {args.hostfile}"
                )
            targets = [(list(hosts)[args.node_rank], cmds[args.node_rank])]
        else:
            targets = list(zip(hosts, cmds))
        if args.dry_run or args.node_rank is None:
            total = sum(hosts.values())
            print(f"# {len(hosts)} nodes, {total} processes, master {master}:{args.master_port}")
            for k, v in env.items():
                print(f"export {k}={shlex.quote(v)}")
            for host, cmd in targets:
                print(f"[{host}] {shlex.join(cmd)}")
            if args.dry_run:
                return 0
            # Without --node-rank, hand the hostfile to DeepSpeed's own pdsh-based runner.
            cmd = [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--hostfile",
                args.hostfile,
                "--master_addr",
                master,
                "--master_port",
                str(args.master_port),
                "--module",
                "train",
                *overrides,
            ]
        else:
            cmd = targets[0][1]
    else:
        n = args.num_gpus or _local_devices(args.cpu)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(n),
            "--master_port",
            str(args.master_port),
            "--module",
            "train",
            *overrides,
        ]
        if args.dry_run:
            for k, v in env.items():
                print(f"export {k}={shlex.quote(v)}")
            print(shlex.join(cmd))
            return 0
    return run_forwarding_sigterm(cmd, {**os.environ, **env})


def _launchers(root_pid: int) -> tuple[Any, list[Any]]:
    """`root_pid` and DeepSpeed's per-node launchers below it (psutil processes; None, [] if gone)."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        below = root.children(recursive=True)
    except psutil.Error:
        return None, []
    launchers = []
    for p in [root, *below]:
        with contextlib.suppress(psutil.Error):
            if "deepspeed.launcher.launch" in p.cmdline():
                launchers.append(p)
    return root, launchers


def _children(launchers: list[Any]) -> list[Any]:
    """The trainers: the children of DeepSpeed's per-node launchers."""
    import psutil

    trainers = []
    for launcher in launchers:
        with contextlib.suppress(psutil.Error):
            trainers += launcher.children()
    return trainers


def run_forwarding_sigterm(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd` (a DeepSpeed launcher); on SIGTERM, signal its trainers and keep waiting for it.

    Before any trainer has started there is nothing to save: DeepSpeed's per-node launchers under it
    (their handler stops their children) and the launcher itself are terminated. The single-node runner
    has no SIGTERM handler: signalled alone, it died and left its per-node launcher to start the
    trainers unattended. pdsh and its ssh sessions are left to the multi-node runner's own handler.

    The handler is installed before the launcher starts: a SIGTERM that arrives while it is being
    started is forwarded as soon as it runs (before, the default action killed this process and
    orphaned the launcher).
    """
    started: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not started:
            pending.append(signum)
            return
        root, launchers = _launchers(started[0].pid)
        trainers = _children(launchers)
        targets = trainers or [*launchers, *([root] if root is not None and root not in launchers else [])]
        for p in targets:
            with contextlib.suppress(Exception):  # psutil.NoSuchProcess, OSError: it has exited already
                p.send_signal(signum)
        what = f"{len(trainers)} trainers" if trainers else "the launcher (no trainer has started)"
        print(f"launch.run: signal {signum} forwarded to {what}", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        started.append(subprocess.Popen(cmd, env=env))
        for signum in pending:
            forward(signum, None)
        return started[0].wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _local_devices(cpu: bool) -> int:
    import torch

    return 1 if cpu or not torch.cuda.is_available() else torch.cuda.device_count()


if __name__ == "__main__":
    raise SystemExit(main())
