"""Test-wide set-up. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is
set here, before lorafusion is imported: the Triton kernels then run on the CPU through numpy."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two xdist workers share two cores; more intra-op threads only contend.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
