import os

# DeepSpeed picks its accelerator at import time; the suite is CPU-only.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import gpu_guard  # noqa: E402  (after the environment above)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whichever tests ran before it on its worker
    (xdist): inputs drawn without an explicit generator are reproducible."""
    torch.manual_seed(0)


def pytest_configure(config):
    # each xdist worker (and every process it starts) draws rendezvous ports from its own slice of
    # 20000-32000: a port picked by one worker's launch is never picked by the other's meanwhile
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:
        # twice as many slices as workers: a crashed worker's replacement (gw<count>, ...) takes a spare
        # one, not a live worker's, and stays below the ephemeral ports
        slices = 2 * int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
        index = int(worker.removeprefix("gw")) % slices
        span = 12000 // slices
        os.environ["FINEMOE_PORTS"] = f"{20000 + index * span}-{20000 + (index + 1) * span}"
    config.addinivalue_line(
        "markers",
        "megablocks: needs CUDA and the megablocks backend (megablocks' compiled ops, grouped_gemm)",
    )


def pytest_runtest_setup(item):
    # gpu / megablocks marks: run, skip with the reason, or fail under FINEMOE_REQUIRE_GPU=1
    gpu_guard.guard_item(item)
