"""Every command line reports bad input the one way (`cli`): `<prog>: error: <one line>` on stderr, exit
status 2, no traceback, nothing written. The table runs each `main()` in this process with a patched
argv; one subprocess per family (a Hydra app, an argparse launcher) shows what only a real process
shows: the interpreter prints no traceback, and the debug switches bring it back.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import fail, guarded, message, user_errors
from tests.train.runner import ROOT

TRAIN = "finemoe-train: error: "
CASES = [
    # (id, module whose main() runs, argv, the expected error line: a prefix, or "..." for any middle)
    ("zero_stage", "train.__main__", ["deepspeed.zero_stage=3"], TRAIN + "deepspeed.zero_stage must be 0, 1 or 2, got 3"),
    ("bucket", "train.__main__", ["deepspeed.reduce_bucket_size=0"], TRAIN + "deepspeed.reduce_bucket_size must be positive, got 0"),
    ("loss_chunks", "train.__main__", ["loss_chunk_tokens=-1"], TRAIN + "loss_chunk_tokens must be >= 0 (0: no chunks), got -1"),
    ("overlap", "train.__main__", ["deepspeed.overlap_comm=true"], TRAIN + "deepspeed.overlap_comm=true needs deepspeed.zero_stage=2, got 1"),
    ("no_cuda", "train.__main__", ["device=cuda"], TRAIN + "device=cuda but CUDA is not available"),
    ("top_k", "train.__main__", ["model.num_experts_per_tok=20"], TRAIN + "model.num_experts_per_tok=20 must be in [1, model.num_experts=14]"),
    ("ep_world", "train.__main__", ["parallel.ep_size=3"], TRAIN + "parallel.ep_size=3 must divide the world size 1"),
    ("init_from", "train.__main__", ["init_from=hf/none"], TRAIN + "init_from='hf/none': checkpoint directory hf/none does not exist"),
    ("glob", "train.__main__", ["data.sources.0.path=corpus/*.jsonl"], TRAIN + "data.sources[0] (path='corpus/*.jsonl'): no file matches the glob corpus/*.jsonl"),
    ("prepared", "train.__main__", ["data.prepared_dir=tok"], TRAIN + "data.prepared_dir='tok': no such directory"),
    ("resume_dir", "train.__main__", ["checkpoint.resume=runs/gone"], TRAIN + "checkpoint.resume='runs/gone': no such checkpoint or run directory"),
    ("unknown_key", "train.__main__", ["optim.lrr=1"], TRAIN + "Could not override 'optim.lrr': Key 'lrr' not in 'OptimConfig'"),
    ("bad_type", "train.__main__", ["optim.lr=fast"], TRAIN + "Error merging override optim.lr=fast: Value 'fast' of type 'str' could not be converted to Float"),
    ("bad_option", "train.__main__", ["model=tiny"], TRAIN + "In 'train': Could not find 'model/tiny': Available options in 'model': qwen1_5_1_8b, "),
    ("eval", "train.__main__", ["eval_every=5", "data.eval_fraction=0"], TRAIN + "eval_every > 0 needs data.eval_fraction > 0"),
    ("shared_run_dir", "train.__main__", ["-m", "run_dir=runs/a", "optim.lr=1e-3,3e-3"], TRAIN + "run_dir is shared by every job of this sweep over optim.lr"),
    ("export_run", "train.export", ["checkpoint=runs/gone", "output=hf"], "finemoe-export: error: checkpoint runs/gone does not exist"),
    ("export_required", "train.export", ["output=hf"], "finemoe-export: error: checkpoint is required: add checkpoint=<value>"),
    ("prepare_output", "data.prepare", [], "finemoe-prepare: error: data.prepared_dir must name the output directory"),
    ("prepare_input", "data.prepare", ["data.prepared_dir=tok", "data.sources.0.path=c.jsonl"], "finemoe-prepare: error: data.sources[0] (path='c.jsonl'): no such file or directory: c.jsonl"),
    ("upcycle_source", "upcycle.__main__", ["source=hf/none", "output=moe"], "finemoe-upcycle: error: checkpoint directory hf/none does not exist"),
    ("params_override", "moe.params", ["model.hidden_size=wide"], "finemoe-params: error: Error merging override model.hidden_size=wide"),
    ("params_parse", "moe.params", ["model.mlp_only_layers=[1,2"], "finemoe-params: error: cannot parse the override 'model.mlp_only_layers=[1,2'"),
    ("memory_ep", "train.memory", ["memory.ep_size=8"], "finemoe-memory: error: memory.ep_size=8 must divide model.num_experts=60"),
    ("hostfile", "launch.run", ["--hostfile", "hosts", "--dry-run"], "python -m launch.run: error: --hostfile hosts: no such file"),
    ("procs", "launch.quickstart", ["--procs", "0"], "python -m launch.quickstart: error: --procs must be >= 1, got 0"),
    ("dense", "launch.ablation", ["--dense", "hf/none"], "python -m launch.ablation: error: --dense hf/none: not a Hugging Face checkpoint (no config.json)"),
]  # fmt: skip


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_main(module: str, argv: list[str], monkeypatch) -> int | str | None:
    loaded = importlib.import_module(module)
    # train's `main` ends the process after a normal return; `run` is the same command in process
    main = loaded.run if module == "train.__main__" else loaded.main
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh working directory; no launcher; any process group the trainer would start is an error."""
    import train.comm

    monkeypatch.chdir(tmp_path)
    for var in ("WORLD_SIZE", "RANK", "FINEMOE_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(var, raising=False)

    def no_process_group(*args, **kwargs):
        raise AssertionError("the process group started before the config was validated")

    monkeypatch.setattr(train.comm.Comm, "init", no_process_group)
    return tmp_path


@pytest.mark.parametrize(("module", "argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    sandbox, monkeypatch, capsys, module, argv, expected
):
    before = tree(sandbox)
    code = run_main(module, argv, monkeypatch)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err + out
    assert lines[-1].startswith(expected), lines
    usage = len(lines) > 1 and lines[0].startswith("usage: ")  # argparse's own errors show the usage first
    assert len(lines) == 1 or usage, lines
    assert tree(sandbox) == before


def test_world_size_rules_use_the_launcher_environment(sandbox, monkeypatch, capsys):
    """WORLD_SIZE is known before the process group exists (Comm.init raises in the sandbox)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_main("train.__main__", ["parallel.ep_size=4"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err == f"{TRAIN}[rank 1] parallel.ep_size=4 must divide the world size 2\n"
    assert run_main("train.__main__", ["-m", "optim.lr=1e-3,3e-3"], monkeypatch) == 2
    assert "-m under a launcher of 2 processes needs hydra.sweep.dir=<dir>" in capsys.readouterr().err
    assert tree(sandbox) == []


def test_help_names_the_command_and_lists_only_the_trainers_groups(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train", "--help"])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module("train.__main__").run()
    out = capsys.readouterr().out
    assert exc.value.code in (0, None)
    assert out.startswith("finemoe-train (python -m train): ") and "__main__" not in out
    assert out.count("\n  python -m train ") + out.count("\n  deepspeed ") == 3
    groups = out.split("== Configuration groups (group=option) ==\n")[1].split("\n\n")[0].splitlines()
    assert [g.split(":")[0].strip() for g in groups] == [
        "model",
        "data",
        "optim",
        "schedule",
        "deepspeed",
        "parallel",
        "logging",
        "checkpointing",
        "experiment",
    ]
    assert "upcycle/moe" not in out  # configs/upcycle/moe is the upcycler's group
    assert "  model: qwen1_5_1_8b, qwen1_5_7b, qwen1_5_moe_a2_7b, tiny_dense, tiny_moe" in groups


# ---- real processes: the interpreter prints no traceback ---------------------------------------------
def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FINEMOE_DEBUG", "HYDRA_FULL_ERROR")}
    env |= {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_hydra_app_process(tmp_path):
    res = _run(["-m", "train", "deepspeed.zero_stage=3"], tmp_path)
    assert (res.returncode, res.stderr) == (2, f"{TRAIN}deepspeed.zero_stage must be 0, 1 or 2, got 3\n")
    assert tree(tmp_path) == []


def test_argparse_launcher_process(tmp_path):
    res = _run(["-m", "launch.run", "--hostfile", "hosts", "--", "max_steps=1"], tmp_path)
    assert (res.returncode, res.stderr) == (
        2,
        "python -m launch.run: error: --hostfile hosts: no such file\n",
    )


@pytest.mark.parametrize("switch", ["FINEMOE_DEBUG", "HYDRA_FULL_ERROR"])
def test_debug_switches_bring_the_traceback_back(sandbox, monkeypatch, switch):
    """The exception leaves `main()`: the interpreter prints its traceback (exit status 1)."""
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv(switch, "1")
    monkeypatch.setattr(sys, "argv", ["moe.params", "model.hidden_size=wide"])
    with pytest.raises(ConfigCompositionException, match="model.hidden_size=wide"):
        importlib.import_module("moe.params").main()
    with pytest.raises(FileNotFoundError, match="--hostfile hosts"):
        importlib.import_module("launch.run").main(["--hostfile", "hosts"])


# ---- the helper itself ----------------------------------------------------------------------------
def test_bugs_keep_their_traceback_and_os_errors_name_the_file(capsys):
    with pytest.raises(RuntimeError), user_errors("prog", debug=False):
        raise RuntimeError("a bug")
    with pytest.raises(SystemExit) as exc, user_errors("prog", debug=False):
        open("/nonexistent/finemoe")  # noqa: SIM115
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prog: error: No such file or directory: /nonexistent/finemoe\n"
    with pytest.raises(ValueError), user_errors("prog", debug=True):
        raise ValueError("shown with its traceback when debugging")


def test_guarded_reports_the_extra_types_it_is_given(capsys):
    @guarded("prog", also=(subprocess.CalledProcessError,))
    def main() -> None:
        raise subprocess.CalledProcessError(2, ["python", "-m", "train"])

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("prog: error: Command '['python', '-m', 'train']' returned")


def test_message_is_one_line():
    e = ValueError("first line.\n\nsecond line\n    full_key: optim.lr\n    object_type=OptimConfig")
    assert message(e) == "first line: second line"
    with pytest.raises(SystemExit):
        fail("prog", "x")


def test_sequences_longer_than_the_model_claims_are_warned_about():
    from train.config import TrainConfig

    cfg = TrainConfig()
    cfg.data.seq_len = 4096
    (warning,) = cfg.validate().warnings(cfg.model_config())
    assert warning.startswith(
        "data.seq_len=4096 exceeds model.max_position_embeddings=2048 (from model): the exported "
        "config.json will claim max_position_embeddings=2048"
    )
    cfg.data.seq_len = 2048
    assert cfg.warnings(cfg.model_config()) == []


def test_a_warmup_the_run_has_no_room_for_is_warned_about():
    from train.config import ScheduleKind, TrainConfig

    cfg = TrainConfig(max_steps=3)
    cfg.schedule.warmup_steps = 10
    (warning,) = cfg.validate().warnings(cfg.model_config())
    assert warning == (
        "schedule.warmup_steps=10 >= max_steps=3: the LR reaches only 27% of optim.lr and never decays"
    )
    cfg.max_steps, cfg.schedule.kind = 12, ScheduleKind.step
    (warning,) = cfg.warnings(cfg.model_config())
    assert warning.startswith(
        "schedule.warmup_steps=10 >= 80% of max_steps=12: the step schedule's first decay"
    )
    cfg.schedule.kind = ScheduleKind.cosine  # cosine decays after any warmup shorter than the run
    assert cfg.warnings(cfg.model_config()) == []


def test_a_run_planned_beyond_the_gpu_memory_is_warned_about():
    """On a GPU, the trainer warns (rank 0, before building anything) when `train.memory`'s plan of
    this very run exceeds the device, naming what would fit."""
    from moe.params import load_preset
    from train.config import TrainConfig
    from train.memory import plan

    cfg = TrainConfig()
    cfg.model = load_preset("qwen1_5_moe_a2_7b")
    cfg.parallel.ep_size, cfg.deepspeed.zero_stage, cfg.deepspeed.bf16 = 4, 2, True
    cfg.deepspeed.micro_batch_size, cfg.data.seq_len = 4, 4096
    cfg.activation_checkpointing = True
    model = cfg.model_config()
    warnings = [w for w in cfg.warnings(model, world_size=8, gpu_memory_bytes=80 * 10**9) if "memory" in w]
    want = plan(model, cfg.memory_config(model, 8)).total / 1e9
    assert warnings == [
        f"the memory plan of this run is {want:.2f} GB per rank, more than this GPU's 80.00 GB "
        "(python -m train.memory shows the parts); with loss_chunk_tokens=1024: 49.15 GB"
    ]
    assert not any("memory plan" in w for w in cfg.warnings(model, world_size=8))  # no GPU: no plan
    cfg.loss_chunk_tokens = 1024
    assert not [w for w in cfg.warnings(model, world_size=8, gpu_memory_bytes=80 * 10**9) if "memory" in w]
    # a dense model ignores parallel.ep_size (the planner refuses it): planned at ep 1, never an error
    cfg.model = load_preset("qwen1_5_1_8b")
    cfg.parallel.ep_size, cfg.activation_checkpointing, cfg.deepspeed.micro_batch_size = 2, False, 8
    (warning,) = cfg.validate(2).warnings(cfg.model_config(), world_size=2, gpu_memory_bytes=80 * 10**9)
    assert warning.startswith("the memory plan of this run is ")
