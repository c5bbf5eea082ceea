"""Multi-process gloo runs through the real deepspeed launcher and the trainer's optimizer step.

Every layout optimises the same objective on the same global batch (the single-process reference
accumulates gradients over as many micro-batches as the others have ranks), so losses, gradient norms
and every gradient must agree. The runs include a step at which one expert receives tokens from one
rank only, and a step at which whole expert-parallel ranks receive no row (`EMPTY_RANK_STEP`).
This proves the collectives under gloo only; NCCL is exercised by `benchmarks/gpu.sh`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moe.model import Qwen2MoEForCausalLM
from tests.train.ep_worker import EMPTY_RANK_STEP, SKEW_STEP, global_batch, tiny_moe
from tests.train.runner import CPU_ENV, free_port, module_cmd, run_tree

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_worker(tmp: Path, procs: int, **runs: str) -> dict[str, dict]:
    """One launch of `procs` processes running each named run (worker arguments) in turn."""
    out = tmp / "records.pt"
    env = dict(os.environ, **CPU_ENV)
    port = free_port()
    args = [str(out), *(f"{name}={args}" for name, args in runs.items())]
    cmd = module_cmd("tests.train.ep_worker", *args, procs=procs, port=port, local_rank_arg=False)
    res = run_tree(cmd, env, timeout=900)
    assert res.returncode == 0 and out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    # DeepSpeed's CPU shared-memory workspace must not outlive the run (train.engine unlinks it)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The references: each layout's global batch in one process, by gradient accumulation."""
    return run_worker(
        tmp_path_factory.mktemp("one"),
        1,
        single="--ga 2 --mb 2",
        single_global="--mb 4 --scope global_batch --no-half-skew",  # mb=4 spans both halves
        single8="--experts 8 --ga 4 --mb 1",
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_worker(
        tmp_path_factory.mktemp("two"),
        2,
        ep2_z1="--ep 2 --zero 1 --mb 2",
        ep2_z2="--ep 2 --zero 2 --mb 2",
        ep2_z2_overlap="--ep 2 --zero 2 --mb 2 --overlap-comm",
        ep1_z1="--ep 1 --zero 1 --mb 2",
        ep2_z0="--ep 2 --zero 0 --mb 2",
        two_global="--ep 2 --mb 2 --scope global_batch --no-half-skew",
        ga_global="--ep 2 --ga 2 --mb 1 --scope global_batch --steps 1",
    )


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    """ZeRO-2, 8 experts, ep 1, 2 and 4 (expert-data-parallel groups of 4, 2 and 1 ranks)."""
    tmp = tmp_path_factory.mktemp("four")
    runs = {f"edp_ep{ep}": f"--experts 8 --ep {ep} --zero 2 --mb 1" for ep in (1, 2, 4)}
    runs["edp_ep2"] += f" --save {tmp / 'run'}"  # then a checkpoint: see test_checkpoint_io_is_shared
    return run_worker(tmp, 4, **runs)


def assert_same(got: dict, want: dict, rtol: float = 1e-5) -> None:
    """Equal up to fp32 summation order: losses and norms to `rtol`, each gradient element to `rtol` of
    its tensor's largest element (different reduction orders, amplified in tiny elements by Adam's
    normalised updates over the steps: measured <= 4e-6 of the largest element after 5 steps)."""
    assert len(got["loss"]) == len(want["loss"]) and len(got["grads"]) == len(want["grads"])
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want["loss"]), rtol=rtol, atol=0)
    torch.testing.assert_close(
        torch.tensor(got["grad_norm"]), torch.tensor(want["grad_norm"]), rtol=rtol, atol=0
    )
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert g.keys() == w.keys()
        for name in w:
            scale = float(w[name].abs().max())
            torch.testing.assert_close(
                g[name], w[name], rtol=rtol, atol=rtol * scale, msg=f"step {step} {name}"
            )


@pytest.mark.parametrize(("ep", "zero"), [(2, 1), (2, 2), (1, 1), (2, 0)])
def test_two_processes_equal_single_process(one_process, two_processes, ep, zero):
    assert_same(two_processes[f"ep{ep}_z{zero}"], one_process["single"])


def test_overlap_comm_gives_the_same_steps(one_process, two_processes):
    """ZeRO-2 with `overlap_comm` (double-buffered buckets reduced on a side stream; on CPU the stream
    is the same, so this checks the bucket bookkeeping, not the overlap) equals one process."""
    assert_same(two_processes["ep2_z2_overlap"], one_process["single"])


def test_skewed_steps_really_are_skewed(one_process):
    reference = one_process["single"]
    """SKEW_STEP routes expert 3 from one half of the batch only and expert 0 from nowhere;
    EMPTY_RANK_STEP leaves experts 2 and 3 (expert-parallel rank 1 of 2) without any row."""
    tokens = reference["expert_tokens"][SKEW_STEP * 2 : SKEW_STEP * 2 + 2]  # the two micro-batches (= ranks)
    assert all((t[:, 0] == 0).all() for t in tokens)
    assert (tokens[0][:, 3] > 0).all() and (tokens[1][:, 3] == 0).all()
    grads = reference["grads"][SKEW_STEP]
    for name, g in grads.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert g[0].abs().max() == 0, name  # no token anywhere: exactly zero gradient
            assert g[3].abs().max() > 0, name
    empty = reference["expert_tokens"][EMPTY_RANK_STEP * 2 : EMPTY_RANK_STEP * 2 + 2]
    assert all((t[:, 2:] == 0).all() and (t[:, :2] > 0).all() for t in empty)
    for name, g in reference["grads"][EMPTY_RANK_STEP].items():
        if name.endswith("experts.down_proj"):
            assert g[2:].abs().max() == 0 and g[:2].abs().max() > 0, name


def test_global_batch_scope_equals_single_process(one_process, two_processes):
    assert_same(two_processes["two_global"], one_process["single_global"])


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_four_processes_expert_data_parallel_equal_single_process(one_process, four_processes, ep):
    """ZeRO-2 on 4 ranks, 8 experts: ep 2 and ep 4 give the losses, gradient norms and gradients of
    ep 1 on the same 4 ranks and of 1 process. At EMPTY_RANK_STEP, EP ranks 1 (ep 2) and 1-3 (ep 4)
    receive no row."""
    assert_same(four_processes[f"edp_ep{ep}"], one_process["single8"])
    assert_same(four_processes[f"edp_ep{ep}"], four_processes["edp_ep1"])


def test_global_batch_with_accumulation_counts_the_step_so_far(two_processes):
    """2 ranks x 2 micro-batches, `global_batch` scope: micro-batch a's balance loss uses the expert
    counts of micro-batches 0..a of *every* rank (as docs/parallel.md and Megatron's global aux loss
    promise). The reference recomputes that objective in one process, without DeepSpeed or
    `Objective`: f_E from the counts so far, P_E from the micro-batch's own probabilities."""
    got = two_processes["ga_global"]
    torch.manual_seed(0)
    model = Qwen2MoEForCausalLM(tiny_moe())
    model.init_weights(torch.Generator().manual_seed(0))
    ids = global_batch(0, 4)
    outs = {}  # (rank, micro-batch) -> output; rank r's micro-batch a is sequence 2r + a
    for r in range(2):
        for a in range(2):
            seq = ids[2 * r + a : 2 * r + a + 1]
            outs[r, a] = model(input_ids=seq[:, :-1], targets=seq[:, 1:])
    total = torch.zeros(())
    so_far_E, rows_so_far = 0.0, 0.0
    for a in range(2):
        for r in range(2):
            so_far_E = so_far_E + sum(b.counts_E for b in outs[r, a].balance)
            rows_so_far = rows_so_far + sum(b.rows for b in outs[r, a].balance)
        for r in range(2):
            out = outs[r, a]
            p_E = sum(b.prob_sum_E for b in out.balance) / sum(b.rows for b in out.balance)
            aux = 4 * (so_far_E / rows_so_far * p_E).sum()
            total = total + (out.ce_loss + 0.01 * aux + 0.001 * out.z_loss) / 4
    total.backward()
    for name, p in model.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(got["grads"][0][name], p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_checkpoint_io_is_shared_and_only_the_share_reaches_the_host(four_processes):
    """4 ranks, ep 2, ZeRO-2: each rank writes an equal share of the checkpoint's tensors (dense state
    over all 4 ranks, each expert's over its expert-data-parallel pair), the shares add up to the whole
    state once, and a rank copies to host memory only its share. Before, `train.engine.full_state`
    handed every rank the whole gathered state on the host: on GPU, A2.7B on 8 ranks moved 478 GB to
    host memory for a 172 GB checkpoint (here: each rank would copy the whole dense state and its EP
    rank's experts, 2-4x its share)."""
    io = four_processes["edp_ep2"]["save_io"]
    model = Qwen2MoEForCausalLM(tiny_moe(8))
    state_bytes = sum(p.numel() for p in model.parameters()) * 3 * 4  # fp32 weight and 2 Adam moments
    assert sum(io["tensor_bytes"]) == state_bytes
    assert max(io["tensor_bytes"]) / min(io["tensor_bytes"]) < 1.01, io
    # beyond the share: the collectives' scalar flags (on CPU they pass through `.to(cpu)`: measured
    # 21-85 bytes) and, on rank 0, the routers' selection biases
    biases = sum(m.selection_bias.numel() * 4 for m in model.modules() if hasattr(m, "selection_bias"))
    for rank, (copied, share) in enumerate(zip(io["host_copied"], io["tensor_bytes"])):
        assert share <= copied <= share + 256 + (biases if rank == 0 else 0), (rank, io)
    assert all(f >= t for f, t in zip(io["file_bytes"], io["tensor_bytes"]))
