"""launch.run: multi-node commands from a hostfile."""

import base64
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.run import read_hostfile

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
