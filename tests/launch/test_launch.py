"""launch.run: multi-node commands from a hostfile."""

import base64
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.run import read_hostfile
from tests.train.runner import TINY, free_port, logged_steps, losses, train
from train import checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_one_correct_command_per_node(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=8  # first node is the master\n\ngpu-b slots=4\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.run",
            "--hostfile",
            str(hostfile),
            "--master-port",
            "4242",
            "--dry-run",
            "--",
            "parallel=ep4",
            "max_steps=7",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines()[0] == "# 2 nodes, 12 processes, master gpu-a:4242"
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0][1:] for ln in lines] == ["gpu-a", "gpu-b"]
    for rank, line in enumerate(lines):
        argv = shlex.split(line.split("] ", 1)[1])
        assert argv[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
        opts = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        assert (
            opts["node_rank"] == str(rank)
            and opts["master_addr"] == "gpu-a"
            and opts["master_port"] == "4242"
        )
        assert json.loads(base64.urlsafe_b64decode(opts["world_info"])) == {
            "gpu-a": list(range(8)),
            "gpu-b": list(range(4)),
        }
        assert argv[-4:] == ["--module", "train", "parallel=ep4", "max_steps=7"]


def test_bad_hostfile(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("gpu-a 8\n")
    with pytest.raises(ValueError, match="hosts:1: expected 'hostname slots=N'"):
        read_hostfile(bad)


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if logged_steps(run) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} steps logged (exit status {proc.poll()})")


@pytest.mark.slow
def test_sigterm_to_launch_run_saves_the_current_step_and_resume_continues(tmp_path):
    """2 trainers under DeepSpeed's launcher; SIGTERM to `python -m launch.run` reaches the trainers
    (not the launcher, which would SIGKILL them 30 s later): they finish the step, save it, exit 0."""
    run, log = tmp_path / "run", tmp_path / "launch.log"
    cmd = [sys.executable, "-m", "launch.run", "--cpu", "--num-gpus", "2", "--master-port", str(free_port())]
    cmd += ["--", *TINY, f"run_dir={run}", "max_steps=400", "parallel=ep2"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for_steps(run, 2, proc)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:  # on a failure, the launcher and its trainers too (its own process group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "launch.run: signal 15 forwarded to 2 trainers" in text
    (ckpt,) = checkpoint.list_complete(run)
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    assert f"stopped by signal 15 at step {step}" in text
    assert max(losses(run)) == step  # the checkpoint holds the step the trainers were in
    # resume continues, here on one process (another world size and ep_size)
    train(run, f"max_steps={step + 1}")
    assert max(losses(run)) == step + 1
    assert [p.name for p in checkpoint.list_complete(run)] == [ckpt.name, f"step_{step + 1:08d}"]


FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" > "$FAKE/srun.args"
trap 'echo TERM > "$FAKE/srun.signal"; exit 0' TERM
echo $$ > "$FAKE/srun.pid.tmp" && mv "$FAKE/srun.pid.tmp" "$FAKE/srun.pid"  # never seen empty
while :; do sleep 0.1; done
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE/scancel.args"
kill -TERM "$(cat "$FAKE/srun.pid")"   # what slurmd does for the job's steps
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo node-a; echo node-b
"""


def fake_slurm(fake: Path, submit: Path, commands: dict[str, str], **env: str) -> dict[str, str]:
    """A submit directory with an empty venv, `commands` as scripts in `fake`, and the environment
    of a 2-node job (id 4242, 8 GPUs each) that puts them first on PATH."""
    fake.mkdir()
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    for name, text in commands.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    return dict(
        os.environ,
        FAKE=str(fake),
        SLURM_SUBMIT_DIR=str(submit),
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="8",
        **env,
    )


def test_slurm_template_forwards_the_early_sigterm_to_the_job_steps(tmp_path):
    """The batch shell alone gets `--signal=B:TERM@N`: its trap passes it on to the steps (scancel
    --signal), then it waits for srun and exits with srun's status. Slurm's commands are faked."""
    fake, submit = tmp_path / "bin", tmp_path / "submit"
    commands = {"srun": FAKE_SRUN, "scancel": FAKE_SCANCEL, "scontrol": FAKE_SCONTROL}
    env = fake_slurm(
        fake,
        submit,
        commands,
        PATH=f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "max_steps=7"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killed whole if the test fails
    )
    try:
        deadline = time.time() + 60
        while not (fake / "srun.pid").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert (fake / "scancel.args").read_text().split() == ["--signal=TERM", "4242"]
    assert (fake / "srun.signal").read_text().strip() == "TERM"
    args = (fake / "srun.args").read_text()
    assert "exec python -m launch.run" in args and "--node-rank $SLURM_NODEID -- max_steps=7" in args
    assert "forwarding it to the trainers" in out


SIGTERM_WHILE_STARTING = """
import os, signal, subprocess
from launch import run
real = subprocess.Popen
def preempted_while_starting(cmd, env):
    proc = real(cmd, env=env)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives before run_forwarding_sigterm has the process
    return proc
subprocess.Popen = preempted_while_starting
print("launcher exit status", run.run_forwarding_sigterm(["sleep", "60"], dict(os.environ)), flush=True)
"""


def test_a_sigterm_while_the_launcher_starts_is_forwarded_not_fatal():
    """Before: the handler was installed after `Popen`; a SIGTERM in between killed `launch.run` with
    the default action and left the launcher running, orphaned."""
    res = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_STARTING], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "launch.run: signal 15 forwarded to the launcher (no trainer has started)" in res.stderr
    assert f"launcher exit status {-signal.SIGTERM}" in res.stdout


RUNNING_SRUN = """#!/usr/bin/env bash
shift  # --kill-on-bad-exit=1
SLURM_NODEID=0 exec "$@"  # as srun starts the task on node 0
"""
ARGV_PYTHON = """#!/usr/bin/env bash
exec "$REAL_PYTHON" -c 'import json, os, sys; print(json.dumps(sys.argv[1:]), file=open(os.environ["FAKE"] + "/argv", "a"))' "$@"
"""


def test_slurm_template_passes_each_override_to_launch_run_unchanged(tmp_path):
    """`srun bash -c "... -- $*"` word-split the overrides and expanded `$`/globs again on the node:
    a list of sources arrived in pieces and `${now:%Y}` as nothing. The fake srun runs the command as
    srun would; `python` records its argv, for the dry run and for the launched step."""
    fake, submit = tmp_path / "bin", tmp_path / "sub mit"  # the hostfile's path has a space too
    commands = {"srun": RUNNING_SRUN, "python": ARGV_PYTHON, "scontrol": FAKE_SCONTROL}
    env = fake_slurm(
        fake,
        submit,
        commands,
        PATH=f"{fake}:{os.environ['PATH']}",
        REAL_PYTHON=sys.executable,
        MASTER_PORT="29500",
    )
    overrides = [
        "data.sources=[{path: /a.jsonl}, {path: /b.jsonl}]",
        "hydra.sweep.dir=runs/${now:%Y}",
        """+note=it's "quoted" * $HOME `x`""",
    ]
    res = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    dry_run, step = [json.loads(line) for line in (fake / "argv").read_text().splitlines()]
    hostfile = dry_run[3]
    assert Path(hostfile).parent == submit
    node = ["--hostfile", hostfile, "--master-addr", "node-a", "--master-port", "29500"]
    assert dry_run == ["-m", "launch.run", *node, "--dry-run", "--", *overrides]
    assert step == ["-m", "launch.run", *node, "--node-rank", "0", "--", *overrides]


TREE_WHILE_STARTING = """
import os, signal, subprocess, sys, time
import psutil
from launch import run
real = subprocess.Popen
def preempted_while_starting(cmd, env):
    proc = real(cmd, env=env)
    while not os.path.exists(sys.argv[1]):  # the child launcher has been forked
        time.sleep(0.01)
    child = psutil.Process(int(open(sys.argv[1]).read()))
    while "deepspeed.launcher.launch" not in child.cmdline():  # and has exec'd: it is one now
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    return proc
subprocess.Popen = preempted_while_starting
# a runner without a SIGTERM handler that started a per-node launcher (here: a sleep named like one)
launcher = "exec -a deepspeed.launcher.launch sleep 60"
script = f"({launcher}) & echo $! > {sys.argv[1]}.tmp && mv {sys.argv[1]}.tmp {sys.argv[1]}; wait"
print("launcher exit status", run.run_forwarding_sigterm(["bash", "-c", script], dict(os.environ)), flush=True)
"""


def test_a_sigterm_before_any_trainer_ends_the_per_node_launchers_too(tmp_path):
    """With no trainer yet, the per-node launchers under the runner are terminated with it, not the
    runner alone (DeepSpeed's runner has no SIGTERM handler: it died and left its launcher running)."""
    import psutil

    pid_file = tmp_path / "child.pid"
    res = subprocess.run(
        [sys.executable, "-c", TREE_WHILE_STARTING, str(pid_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "forwarded to the launcher (no trainer has started)" in res.stderr

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    child, deadline = int(pid_file.read_text()), time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)
