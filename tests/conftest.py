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
    config.addinivalue_line(
        "markers",
        "megablocks: needs CUDA and the megablocks backend (megablocks' compiled ops, grouped_gemm)",
    )


def pytest_runtest_setup(item):
    # gpu / megablocks marks: run, skip with the reason, or fail under FINEMOE_REQUIRE_GPU=1
    gpu_guard.guard_item(item)
