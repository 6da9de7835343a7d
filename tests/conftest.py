"""Shared pytest setup: import the project's modules from the repo root, keep torch small and seeded."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The unit tests use tiny tensors, where intra-op threads cost far more than they save: on a busy
# 2-core machine a LeNet step took ~0.27 s with 2 threads and ~0.002 s with 1 (OpenMP threads
# spin-wait for a core). One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so random tensors (and failures) reproduce."""
    torch.manual_seed(0)
    yield
